/*
 * worker_host.hpp — a header-only C++17 layer over worker_host.h, for handlers written in C++.
 *
 * What it does, and nothing more:
 *
 *   - `WH_EXPORT_HANDLER(Type, name, version, max_concurrency, features)` exports
 *     `wh_handler_entry` with a descriptor whose `init` constructs one `Type` from a `wh::Init`,
 *     whose `handle` calls `Type::handle(wh::Job &)` (const or not: it may run on several threads
 *     at once unless max_concurrency is 1), and whose `teardown` destroys the object.
 *   - Every C++ exception stops at the boundary (no unwinding into the host, which would abort
 *     the worker): a `wh::Error` becomes `set_error(type(), what())`, any other `std::exception`
 *     becomes `set_error(<its dynamic type name>, what())`, and anything else a generic message.
 *     The job (or `init`) then fails; the worker goes on.
 *   - `wh::Init` and `wh::Job` are views of one call: they borrow the host's strings (valid until
 *     the call returns) and forward to the host's callbacks, which copy what they are given.
 *     Nothing crosses the boundary with a destructor attached.
 *
 * The echo handler:
 *
 *     #include "worker_host.hpp"
 *
 *     struct Echo {
 *         explicit Echo(const wh::Init &) {}
 *         void handle(wh::Job &job) const { job.set_output(job.input()); }
 *     };
 *
 *     WH_EXPORT_HANDLER(Echo, "my-echo", "0.1.0", 0, 0)
 *
 * Compiles warning-free as C++17 with -Wall -Wextra -pedantic. The rules of the ABI (threads,
 * lifetimes, status codes) are those of worker_host.h.
 */
#ifndef WORKER_HOST_HPP
#define WORKER_HOST_HPP

#include "worker_host.h"

#include <cstdlib>
#include <exception>
#include <new>
#include <stdexcept>
#include <string>
#include <string_view>
#include <typeinfo>
#include <utility>

#if defined(__has_include)
#if __has_include(<cxxabi.h>)
#include <cxxabi.h>
#define WH_HPP_HAVE_CXXABI 1
#endif
#endif

namespace wh {

/** A typed handler error: thrown from `handle` or the constructor, it becomes the job's (or
 *  init's) error with this type and message. */
class Error : public std::runtime_error {
  public:
    Error(std::string type, const std::string &message)
        : std::runtime_error(message), type_(std::move(type)) {}

    /** The error type the host reports (`error_type`), for example "ValueError". */
    const std::string &type() const noexcept { return type_; }

  private:
    std::string type_;
};

/** What every call can do: log through the host, tagged with the job id. */
class Call {
  public:
    Call(wh_call *call, const wh_host_api *host) noexcept : call_(call), host_(host) {}

    /** Writes a log line through the host's logger. */
    void log(wh_log_level level, std::string_view message) const noexcept {
        host_->log(call_, level, message.data(), message.size());
    }

    /** The raw call handle and callback table, for anything this layer does not wrap. */
    wh_call *raw_call() const noexcept { return call_; }
    const wh_host_api *raw_host() const noexcept { return host_; }

  protected:
    wh_call *call_;
    const wh_host_api *host_;
};

/** The `init` call: the handler's configuration (JSON text, `{}` when none was given). */
class Init : public Call {
  public:
    Init(wh_call *call, const wh_host_api *host, std::string_view config) noexcept
        : Call(call, host), config_(config) {}

    /** The configuration as JSON text; borrowed until init returns. */
    std::string_view config() const noexcept { return config_; }

  private:
    std::string_view config_;
};

/** One job, during `handle`. The strings are borrowed until `handle` returns: copy what must
 *  outlive it. Every callback copies what it is given before it returns. */
class Job : public Call {
  public:
    Job(wh_call *call, const wh_host_api *host, const wh_job *job) noexcept
        : Call(call, host), job_(job) {}

    /** The job id. */
    std::string_view id() const noexcept { return {job_->id, job_->id_len}; }
    /** The job's `input`, as JSON text. */
    std::string_view input() const noexcept { return {job_->input_json, job_->input_json_len}; }
    /** The whole job object, as JSON text. */
    std::string_view job_json() const noexcept {
        return {job_->job_json, job_->job_json_len};
    }

    /** Sets the job's output (one JSON value). A refused value fails the job (see the header). */
    wh_status set_output(std::string_view json) const noexcept {
        return host_->set_output(call_, json.data(), json.size());
    }
    /** Emits a stream chunk (streaming handlers: WH_FEATURE_STREAMING). WH_STATUS_CANCELLED once
     *  the job is cancelled. */
    wh_status emit(std::string_view json) const noexcept {
        return host_->emit(call_, json.data(), json.size());
    }
    /** Reports progress (one JSON value). */
    wh_status progress(std::string_view json) const noexcept {
        return host_->progress(call_, json.data(), json.size());
    }
    /** Whether the job was cancelled: return soon when it is. */
    bool is_cancelled() const noexcept { return host_->is_cancelled(call_); }
    /** Asks for the worker to be recycled after this job (RunPod's refresh_worker). */
    void request_recycle() const noexcept { host_->request_recycle(call_); }

  private:
    const wh_job *job_;
};

namespace detail {

/** Reports the exception being handled with `set_error`. Call only inside a catch block. Does not
 *  allocate for a std::exception other than wh::Error beyond the type name's demangling. */
inline void report_current_exception(wh_call *call, const wh_host_api *host) noexcept {
    try {
        throw;
    } catch (const Error &error) {
        const std::string &type = error.type();
        const std::string_view message = error.what();
        host->set_error(call, type.data(), type.size(), message.data(), message.size());
    } catch (const std::exception &error) {
        const std::string_view message = error.what();
        const char *type = typeid(error).name();
        char *demangled = nullptr;
#ifdef WH_HPP_HAVE_CXXABI
        int demangle_status = 0;
        demangled = abi::__cxa_demangle(type, nullptr, nullptr, &demangle_status);
        if (demangled != nullptr) {
            type = demangled;
        }
#endif
        const std::string_view type_view = type;
        host->set_error(call, type_view.data(), type_view.size(), message.data(),
                        message.size());
        std::free(demangled);
    } catch (...) {
        static const char type[] = "CppException";
        static const char message[] = "a C++ exception that is not a std::exception";
        host->set_error(call, type, sizeof type - 1, message, sizeof message - 1);
    }
}

/** The descriptor's functions for handler type `T`, and the one instance `init` makes. */
template <typename T> struct Exported {
    // Made by init, destroyed by teardown; never by a static destructor, which could run while
    // a job still does at process exit.
    static inline T *instance = nullptr;

    static wh_status init(wh_call *call, const wh_host_api *host, const char *config,
                          size_t config_len) noexcept {
        try {
            instance = new T(Init(call, host, std::string_view(config, config_len)));
            return WH_STATUS_OK;
        } catch (...) {
            report_current_exception(call, host);
            return WH_STATUS_ERROR;
        }
    }

    static wh_status handle(wh_call *call, const wh_host_api *host, const wh_job *job) noexcept {
        try {
            Job view(call, host, job);
            instance->handle(view);
            return WH_STATUS_OK;
        } catch (...) {
            report_current_exception(call, host);
            return WH_STATUS_ERROR;
        }
    }

    static void teardown(wh_call *call, const wh_host_api *host) noexcept {
        try {
            delete instance;
        } catch (...) {
            // A destructor that throws: nothing can be reported during teardown but a log line.
            static const char message[] = "the handler's destructor threw; ignored";
            host->log(call, WH_LOG_ERROR, message, sizeof message - 1);
        }
        instance = nullptr;
    }

    /** The descriptor, built field by field so fields appended in later ABI minors are zero. */
    static wh_handler_descriptor describe(const char *name, const char *version,
                                          uint32_t max_concurrency, uint64_t features) noexcept {
        wh_handler_descriptor descriptor{};
        descriptor.struct_size = sizeof(wh_handler_descriptor);
        descriptor.abi_major = WH_ABI_MAJOR;
        descriptor.abi_minor = WH_ABI_MINOR;
        descriptor.name = name;
        descriptor.version = version;
        descriptor.max_concurrency = max_concurrency;
        descriptor.reserved0 = 0;
        descriptor.features = features;
        descriptor.init = &Exported::init;
        descriptor.handle = &Exported::handle;
        descriptor.teardown = &Exported::teardown;
        return descriptor;
    }
};

} // namespace detail
} // namespace wh

/**
 * Exports `wh_handler_entry` for the handler class `Type` (see the top of this file). `name` and
 * `version` are string literals; `max_concurrency` is 1 for a handler that is not thread-safe and
 * 0 for no limit; `features` is 0 or WH_FEATURE_STREAMING. Use it once, at namespace scope.
 */
#define WH_EXPORT_HANDLER(Type, name, version, max_concurrency, features)                        \
    extern "C" const wh_handler_descriptor *wh_handler_entry(void) {                             \
        static const wh_handler_descriptor descriptor =                                          \
            ::wh::detail::Exported<Type>::describe((name), (version), (max_concurrency),         \
                                                   (features));                                  \
        return &descriptor;                                                                      \
    }

#endif /* WORKER_HOST_HPP */
