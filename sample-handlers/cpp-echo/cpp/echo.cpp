// The echo handler in C++, on worker_host.hpp: returns each job's input unchanged. The input
// "throw" throws instead, to show that an exception becomes the job's error.
#include "worker_host.hpp"

#include <stdexcept>

struct Echo {
    explicit Echo(const wh::Init &init) { init.log(WH_LOG_INFO, "c++ echo handler ready"); }

    void handle(wh::Job &job) const {
        if (job.input() == "\"throw\"") {
            throw std::runtime_error("thrown on request");
        }
        job.set_output(job.input()); // the host copies the borrowed input
    }
};

WH_EXPORT_HANDLER(Echo, "cpp-echo-handler", "0.1.0", 0, 0)
