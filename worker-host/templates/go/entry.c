/* The C half of the handler: the static descriptor, the exported entry point, and the callers
 * of the host's callbacks (Go cannot call a C function pointer). */
#include "worker_host.h"
#include "_cgo_export.h"

void wh_go_log(const wh_host_api *host, wh_call *call, wh_log_level level, const char *message,
               size_t len) {
    host->log(call, level, message, len);
}

wh_status wh_go_set_output(const wh_host_api *host, wh_call *call, const char *json, size_t len) {
    return host->set_output(call, json, len);
}

wh_status wh_go_set_error(const wh_host_api *host, wh_call *call, const char *type,
                          size_t type_len, const char *message, size_t message_len) {
    return host->set_error(call, type, type_len, message, message_len);
}

/* cgo declares the Go functions with non-const pointers; they only read through them. */
static wh_status handler_init(wh_call *call, const wh_host_api *host, const char *config_json,
                              size_t config_json_len) {
    return goInit(call, (wh_host_api *)host, (char *)config_json, config_json_len);
}

static wh_status handler_handle(wh_call *call, const wh_host_api *host, const wh_job *job) {
    return goHandle(call, (wh_host_api *)host, (wh_job *)job);
}

static const wh_handler_descriptor DESCRIPTOR = {
    .struct_size = sizeof(wh_handler_descriptor),
    .abi_major = WH_ABI_MAJOR,
    .abi_minor = WH_ABI_MINOR,
    .name = "{{name}}",
    .version = "0.1.0",
    .max_concurrency = 0, /* 0: any number of jobs at once; 1 if not thread-safe */
    .reserved0 = 0,
    .features = 0,
    .init = handler_init,
    .handle = handler_handle,
    .teardown = NULL,
};

const wh_handler_descriptor *wh_handler_entry(void) { return &DESCRIPTOR; }
