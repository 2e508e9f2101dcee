// An echo handler for worker-host, in C++ on worker_host.hpp: returns each job's input unchanged.
// An exception thrown here fails only its job, with its what() as the message.
#include "worker_host.hpp"

struct Echo {
    // init: runs once, before the first job. Load your model here.
    explicit Echo(const wh::Init &init) { init.log(WH_LOG_INFO, "{{name}} ready"); }

    // Runs one job; may run on several threads at once (see WH_EXPORT_HANDLER's 0 below).
    void handle(wh::Job &job) const { job.set_output(job.input()); }
};

// Name, version, max concurrency (0: no limit, 1: not thread-safe), features.
WH_EXPORT_HANDLER(Echo, "{{name}}", "0.1.0", 0, 0)
