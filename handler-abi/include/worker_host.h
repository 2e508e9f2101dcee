/*
 * worker_host.h — the handler ABI of worker-host, version 1.1.
 *
 * This header is the single source of truth for the contract between `worker-host` (the host)
 * and a handler compiled as a shared library (the handler). Any language that can export a C
 * symbol can implement it.
 *
 * The shape of the contract:
 *
 *   1. The handler exports exactly one symbol, `wh_handler_entry` (see WH_ENTRY_SYMBOL), a
 *      function that returns a pointer to a static `wh_handler_descriptor`.
 *   2. The host reads `struct_size` and `abi_major` first and refuses a handler built for another
 *      ABI major before it touches any other field.
 *   3. The host calls `init` once, before any job, then `handle` once per job (possibly from
 *      several threads at once, up to `max_concurrency`), then `teardown` once at shutdown.
 *   4. During a call the handler talks back to the host through the `wh_host_api` callback table.
 *      Everything the handler gives the host (output, errors, stream chunks, progress, log lines)
 *      is copied by the host before the callback returns. Everything the host gives the handler
 *      (the job, the config) is borrowed for the duration of the call. No memory is ever freed on
 *      the other side of the boundary.
 *
 * Compatibility rules (why the structs look the way they do):
 *
 *   - Every struct that crosses the boundary starts with `struct_size`, the size of the struct as
 *     the side that filled it was compiled. New fields are only ever appended; nothing is
 *     reordered or repurposed. A reader checks `struct_size` before reading an appended field.
 *   - A handler built against ABI 1.x runs on every host speaking 1.y, for any x and y. A host
 *     refuses a handler whose `abi_major` differs from its own.
 *   - No unwinding across the boundary: C++ exceptions and Rust panics must be caught inside the
 *     handler and reported with `set_error`.
 *
 * What each minor appended:
 *
 *   - 1.1: two callbacks at the end of `wh_host_api`: `set_error_traceback` (a traceback with a
 *     call's error, shown as RunPod's `error_traceback`) and `set_features` (`init` reports the
 *     streaming flag and concurrency it learnt only while it ran). Nothing else changed: a 1.0
 *     handler runs on a 1.1 host as it is. A handler built against this header that may also run
 *     on a 1.0 host checks `host->abi_minor >= 1` (or, equivalently, that `host->struct_size`
 *     reaches past the callback) before calling either; on a 1.0 host the table ends before them.
 *     The host needs nothing new from the handler: the descriptor is unchanged, so a 1.1 host
 *     reads exactly the 1.0 fields of every handler's descriptor.
 *
 * Strings: every string the host passes is UTF-8, given as a pointer and a byte length, and is
 * also NUL-terminated (`ptr[len] == '\0'`) for the convenience of C code. Every string the handler
 * passes to a callback is a pointer and a byte length; it need not be NUL-terminated, and
 * `(NULL, 0)` is accepted wherever a string may be empty.
 */
#ifndef WORKER_HOST_H
#define WORKER_HOST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** The ABI major version this header describes. Changes only with a breaking change. */
#define WH_ABI_MAJOR 1
/** The ABI minor version this header describes. Grows when fields or callbacks are appended. */
#define WH_ABI_MINOR 1

/** The name of the one symbol a handler library exports. */
#define WH_ENTRY_SYMBOL "wh_handler_entry"

/** Descriptor feature bit: the handler streams its output with `emit` (a "generator" handler in
 *  the RunPod Python SDK's terms). Its final result is the list of chunks, not `set_output`. */
#define WH_FEATURE_STREAMING ((uint64_t)1u << 0)

/** Status codes returned by handler functions and by host callbacks. A plain 32-bit integer
 *  (not an enum type) so its size is the same in every compiler and language. */
typedef int32_t wh_status;
/** Success. */
#define WH_STATUS_OK ((wh_status)0)
/** The handler failed; the reason was (or should have been) given with `set_error`. */
#define WH_STATUS_ERROR ((wh_status)1)
/** A callback was given an argument it cannot accept (a NULL pointer with a non-zero length, or
 *  JSON that does not parse). Nothing was recorded (but a refused `set_output` fails the job:
 *  see there). */
#define WH_STATUS_INVALID_ARGUMENT ((wh_status)2)
/** A callback was called where it does not apply (for example `emit` during `init`, `emit` from a
 *  handler that does not declare WH_FEATURE_STREAMING, `set_output` from one that does, or any
 *  callback with a `wh_call` whose handler function has returned). Nothing was recorded. */
#define WH_STATUS_INVALID_STATE ((wh_status)3)
/** The value is larger than the host accepts (see the host's size limits); the host checks the
 *  length before it reads a byte. Nothing was recorded (but a refused `set_output` fails the job:
 *  see there). */
#define WH_STATUS_TOO_LARGE ((wh_status)4)
/** The job was cancelled; the handler should return as soon as it can. Returned by `emit` and
 *  `progress` once the job is cancelled, so a streaming loop stops without polling. */
#define WH_STATUS_CANCELLED ((wh_status)5)

/** Log levels for `wh_host_api.log`, from the most to the least verbose. Unknown values are
 *  logged at INFO. */
typedef int32_t wh_log_level;
#define WH_LOG_TRACE ((wh_log_level)0)
#define WH_LOG_DEBUG ((wh_log_level)1)
#define WH_LOG_INFO ((wh_log_level)2)
#define WH_LOG_WARN ((wh_log_level)3)
#define WH_LOG_ERROR ((wh_log_level)4)

/**
 * An opaque handle the host passes to every handler function. It identifies one call (one
 * `init`, one job, or the `teardown`) and is the first argument of every callback.
 *
 * Valid only until the handler function it was passed to returns. Never NULL. It is an
 * identifier, not an address: it may hold any non-NULL value, so never dereference it and
 * compare it only for equality. The host never hands out the same one twice, so a callback made
 * with an expired `wh_call` (say, from a thread the handler left running) is not undefined
 * behaviour: it records nothing and returns WH_STATUS_INVALID_STATE (`log` and `request_recycle`
 * do nothing, `is_cancelled` returns false). Handlers must not rely on this to deliver anything:
 * whatever they pass after the call returned is dropped.
 */
typedef struct wh_call wh_call;

/**
 * The host's services, passed to every handler function. The table itself lives as long as the
 * host process; the `wh_call` given with it expires when the handler function returns.
 *
 * Every callback is thread-safe: a handler may call it from any thread, including threads it
 * spawned itself, as long as the call it belongs to has not returned. A callback with a `wh_call`
 * whose handler function has returned is refused (see `wh_call`). A callback that is running
 * when its handler function returns completes normally: the host ends the call only once it has
 * returned.
 *
 * Lengths: a pointer must point to as many readable bytes as its length says. The host checks
 * each length against what the callback accepts before it reads the string, so an absurd length
 * (SIZE_MAX, say) is refused, never read: over the output limit for `set_output` and `progress`
 * and over the stream chunk limit for `emit` (WH_STATUS_TOO_LARGE), over PTRDIFF_MAX for
 * `set_error` and `set_error_traceback` (WH_STATUS_INVALID_ARGUMENT) and `log` (the line is
 * dropped).
 */
typedef struct wh_host_api {
    /** sizeof(wh_host_api) as the host was compiled. Check it (or `abi_minor`) before using a
     *  callback appended after ABI 1.0. */
    uint32_t struct_size;
    /** The host's ABI major version (WH_ABI_MAJOR). */
    uint16_t abi_major;
    /** The host's ABI minor version (WH_ABI_MINOR). */
    uint16_t abi_minor;

    /**
     * Write a log line through the host's logger, tagged with the call's job id.
     *
     * When: during any call. Thread: any.
     * `message`: UTF-8, `message_len` bytes, copied before return; `(NULL, 0)` logs an empty line.
     * Invalid UTF-8 is replaced, not refused. A line over 64 KiB is cut there (only its first
     * 64 KiB are read), with a note giving its length. Returns nothing: NULL with a non-zero
     * length, a length over PTRDIFF_MAX, or an expired `wh_call` logs nothing.
     */
    void (*log)(wh_call *call, wh_log_level level, const char *message, size_t message_len);

    /**
     * Set the job's output: one JSON value (object, array, string, number, boolean or null).
     *
     * When: during `handle`, only for a handler that does not declare WH_FEATURE_STREAMING (a
     * streaming handler's result is its chunks). Thread: any. May be called more than once.
     * `json` is copied before return.
     *
     * Returns WH_STATUS_OK when recorded: the value replaces any earlier one.
     * WH_STATUS_INVALID_ARGUMENT when `json` is NULL with a non-zero length or does not parse as
     * one JSON value; WH_STATUS_TOO_LARGE when it exceeds the output limit (checked before `json`
     * is read). After either, the value is not recorded, and the job fails with a message saying
     * why, even if an earlier call was accepted, unless a later call is accepted: the last call
     * that returned one of these three statuses decides. WH_STATUS_INVALID_STATE outside
     * `handle`, for a streaming handler, or with an expired `wh_call`: nothing is recorded and
     * the job's result is unchanged.
     */
    wh_status (*set_output)(wh_call *call, const char *json, size_t json_len);

    /**
     * Fail the call with a typed error. The host maps it to RunPod's error shape.
     *
     * When: during `init` or `handle`. Thread: any. The last accepted call wins. Both strings
     * are copied before return; `error_type` may be `(NULL, 0)` (the host then uses
     * "HandlerError"), and `message` may be `(NULL, 0)`. Invalid UTF-8 is replaced.
     *
     * Setting an error does not end the call: the handler still returns, and its result is an
     * error whatever it returns. Returns WH_STATUS_OK when recorded;
     * WH_STATUS_INVALID_ARGUMENT when either string is NULL with a non-zero length or its length
     * is over PTRDIFF_MAX; WH_STATUS_INVALID_STATE during `teardown` or with an expired
     * `wh_call`. Nothing is recorded unless it returns WH_STATUS_OK.
     */
    wh_status (*set_error)(wh_call *call, const char *error_type, size_t error_type_len,
                           const char *message, size_t message_len);

    /**
     * Emit one stream chunk (one JSON value). The host delivers chunks in the order of the
     * `emit` calls that returned WH_STATUS_OK.
     *
     * When: during `handle`, only for a handler that declares WH_FEATURE_STREAMING.
     * Thread: any. `json` is copied before return.
     *
     * Returns WH_STATUS_OK when queued for delivery; WH_STATUS_INVALID_ARGUMENT for NULL with a
     * non-zero length or unparsable JSON; WH_STATUS_TOO_LARGE over the stream chunk limit
     * (checked before `json` is read; the job then fails, with the chunk's size and the limit);
     * WH_STATUS_INVALID_STATE for a non-streaming handler, outside `handle` or with an expired
     * `wh_call`; WH_STATUS_CANCELLED once the job is cancelled (the chunk is
     * dropped and the handler should return). Nothing is delivered unless it returns
     * WH_STATUS_OK.
     */
    wh_status (*emit)(wh_call *call, const char *json, size_t json_len);

    /**
     * Report progress (one JSON value, for example {"percent": 40}). Delivered to RunPod as
     * `{"status": "IN_PROGRESS", "output": <value>}`, in order, always before the job's result.
     *
     * When: during `handle`. Thread: any. `json` is copied before return.
     *
     * Returns the same states as `emit`, except that any handler may report progress.
     */
    wh_status (*progress)(wh_call *call, const char *json, size_t json_len);

    /**
     * Whether the job has been cancelled (stopped by the platform, timed out, or the worker is
     * shutting down past its grace period). Cheap: an atomic load. Long-running handlers should
     * check it regularly and return early when it is true.
     *
     * When: during `handle`. Thread: any. Returns false outside `handle` and with an expired
     * `wh_call`.
     */
    bool (*is_cancelled)(wh_call *call);

    /**
     * Ask for this worker to be recycled once the current job is finished (RunPod's
     * `refresh_worker`): the job's result carries `"stopPod": true`, and the platform replaces
     * the worker. Use it after a job leaves the process in a state later jobs should not see. As
     * with the Python SDK, the worker goes on serving until the platform stops it, so a job may
     * still arrive meanwhile.
     *
     * When: during `handle`. Thread: any. Idempotent. Returns nothing; does nothing outside
     * `handle` or with an expired `wh_call`.
     */
    void (*request_recycle)(wh_call *call);

    /* Appended in ABI 1.1: check `abi_minor >= 1` before calling the callbacks below. */

    /**
     * Attach a traceback to the call's error (ABI 1.1): where the error was raised and how the
     * code got there, as text (a Python traceback, a Rust panic's location and backtrace, a C++
     * exception's stack). The host reports it as the `error_traceback` of RunPod's error payload,
     * in process and in a runner alike; for a failed `init` the host logs it after the failure.
     *
     * When: during `init` or `handle`, before or after `set_error`. Thread: any. Only a handler
     * that checked `host->abi_minor >= 1` may call it. `traceback` is UTF-8 (invalid bytes are
     * replaced), copied before return; `(NULL, 0)` clears an earlier traceback. The last accepted
     * call wins. A traceback over 64 KiB is cut there (only its first 64 KiB are read), with a
     * note giving its length.
     *
     * It does not fail the call: the traceback is reported only if the call fails with an error
     * set by `set_error`, and is dropped otherwise (also when the host fails the job for an output
     * it refused: that refusal has no traceback). Returns WH_STATUS_OK when recorded;
     * WH_STATUS_INVALID_ARGUMENT when `traceback` is NULL with a non-zero length or its length is
     * over PTRDIFF_MAX; WH_STATUS_INVALID_STATE during `teardown` or with an expired `wh_call`.
     * Nothing is recorded unless it returns WH_STATUS_OK.
     */
    wh_status (*set_error_traceback)(wh_call *call, const char *traceback, size_t traceback_len);

    /**
     * Report the handler's features as `init` found them (ABI 1.1), for a handler that learns
     * them only while it runs (a bridge that loads a script learns only then whether the script
     * streams, and whether it is thread-safe). They replace the descriptor's `max_concurrency`
     * and `features` for every job of this loaded handler, once `init` has returned WH_STATUS_OK;
     * a failed `init` leaves the descriptor's. (`worker-host inspect` runs no `init`: it shows the
     * descriptor's.)
     *
     * When: during `init` only. Thread: any. Only a handler that checked `host->abi_minor >= 1`
     * may call it. `max_concurrency` means what the descriptor field means (1 for a handler that
     * is not thread-safe, 0 for no limit; the host runs at most min(this, the operator's
     * setting)); `features` is WH_FEATURE_* bits, and unknown bits are ignored. The last accepted
     * call wins; a handler that never calls it keeps its descriptor's values.
     *
     * Returns WH_STATUS_OK when recorded; WH_STATUS_INVALID_STATE outside `init` or with an
     * expired `wh_call` (nothing is recorded).
     */
    wh_status (*set_features)(wh_call *call, uint32_t max_concurrency, uint64_t features);
} wh_host_api;

/**
 * One job, borrowed by the handler for the duration of `handle`. All strings are UTF-8 and
 * NUL-terminated (the length excludes the NUL).
 */
typedef struct wh_job {
    /** sizeof(wh_job) as the host was compiled. */
    uint32_t struct_size;
    /** The job id. Never NULL; may be empty only in hand-made test jobs. */
    const char *id;
    size_t id_len;
    /** The job's `input` as JSON text (any JSON value). Never NULL. */
    const char *input_json;
    size_t input_json_len;
    /** The whole job object as JSON text, with every key the platform sent (`id`, `input`,
     *  `webhook`, `policy`, ...). Never NULL. */
    const char *job_json;
    size_t job_json_len;
} wh_job;

/**
 * Run once, before any job, on a host thread that is not used for I/O, with at least 8 MiB of
 * stack (see `wh_handle_fn`). Load models and warm caches here. `handle` and `teardown` may run on
 * other threads: state that must outlive `init` belongs in the handler's own storage, not in
 * thread-local variables.
 *
 * `config_json`: the handler configuration given to the host (a JSON value, `{}` when none was
 * given), borrowed for the duration of the call, NUL-terminated.
 *
 * Return WH_STATUS_OK when ready to take jobs. Return anything else (ideally after `set_error`
 * with the reason) to refuse to start: the host then exits with that reason and takes no job.
 * `teardown` is not called after a failed `init`.
 */
typedef wh_status (*wh_init_fn)(wh_call *call, const wh_host_api *host, const char *config_json,
                                size_t config_json_len);

/**
 * Run one job. Called on a host worker thread, never on the thread that does the host's I/O.
 * Up to `max_concurrency` calls run at the same time, on different threads. Successive calls may
 * run on different threads, so thread-local state does not carry from one job to the next.
 *
 * Stack: at least 8 MiB. Jobs run on host threads of 8 MiB (in the host's runner process by
 * default); `init` and `teardown` run on threads of 8 MiB or on the main thread, whose stack is
 * the process's limit (`ulimit -s`: 8 MiB on Linux unless the operator lowered it), as does a
 * `--test_input` job with `--isolation none`. A handler that needs more must run its work on a
 * thread of its own.
 *
 * The job is borrowed until return. The handler reports its result with the callbacks:
 * `set_output` (or `emit` for a streaming handler) on success, `set_error` on failure.
 *
 * Returns WH_STATUS_OK for success (an output never set is JSON `null`) or WH_STATUS_ERROR for
 * failure. A call that set an error fails whatever it returns.
 */
typedef wh_status (*wh_handle_fn)(wh_call *call, const wh_host_api *host, const wh_job *job);

/**
 * Run once at shutdown, after the last job has returned, on the same kind of thread as `init`.
 * Release resources that need an orderly end (flush files, close connections). May be NULL.
 * The library is not unloaded afterwards.
 */
typedef void (*wh_teardown_fn)(wh_call *call, const wh_host_api *host);

/**
 * The handler's descriptor: static, immutable, valid for the life of the process.
 */
typedef struct wh_handler_descriptor {
    /** sizeof(wh_handler_descriptor) as the handler was compiled. Always first. */
    uint32_t struct_size;
    /** WH_ABI_MAJOR the handler was built with. Always at this offset, in every ABI major. */
    uint16_t abi_major;
    /** WH_ABI_MINOR the handler was built with. */
    uint16_t abi_minor;
    /** The handler's name, static, NUL-terminated UTF-8. Never NULL. */
    const char *name;
    /** The handler's version, static, NUL-terminated UTF-8. Never NULL. */
    const char *version;
    /** How many `handle` calls may run at once: 1 for a handler that is not thread-safe,
     *  0 for no limit. The host runs at most min(this, the operator's setting). `init` may
     *  replace it with `set_features` (ABI 1.1). */
    uint32_t max_concurrency;
    /** Reserved, must be zero. Keeps `features` 8-byte aligned on every platform. */
    uint32_t reserved0;
    /** WH_FEATURE_* bits. Unknown bits are ignored by the host. `init` may replace them with
     *  `set_features` (ABI 1.1). */
    uint64_t features;
    /** Never NULL. */
    wh_init_fn init;
    /** Never NULL. */
    wh_handle_fn handle;
    /** May be NULL. */
    wh_teardown_fn teardown;
} wh_handler_descriptor;

/**
 * The entry point, the only symbol a handler exports. Returns a pointer to a static descriptor,
 * or NULL if the handler cannot run in this process at all (the host then refuses to load it).
 *
 * Thread: called once by the host, from its main thread, before anything else. Must not block,
 * allocate what it cannot keep, or call back into the host.
 */
typedef const wh_handler_descriptor *(*wh_handler_entry_fn)(void);

/** The declaration of the entry point, for handlers written in C or C++. */
const wh_handler_descriptor *wh_handler_entry(void);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* WORKER_HOST_H */
