/* The echo handler in C: returns each job's input unchanged. Exports only wh_handler_entry. */
#include "worker_host.h"

static wh_status echo_init(wh_call *call, const wh_host_api *host, const char *config_json,
                           size_t config_json_len) {
    (void)config_json;
    (void)config_json_len;
    static const char message[] = "c echo handler ready";
    host->log(call, WH_LOG_INFO, message, sizeof message - 1);
    return WH_STATUS_OK;
}

static wh_status echo_handle(wh_call *call, const wh_host_api *host, const wh_job *job) {
    /* The input is borrowed; set_output copies it before returning. */
    return host->set_output(call, job->input_json, job->input_json_len);
}

static const wh_handler_descriptor DESCRIPTOR = {
    .struct_size = sizeof(wh_handler_descriptor),
    .abi_major = WH_ABI_MAJOR,
    .abi_minor = WH_ABI_MINOR,
    .name = "c-echo-handler",
    .version = "0.1.0",
    .max_concurrency = 0, /* stateless, so any number of jobs at once */
    .reserved0 = 0,
    .features = 0,
    .init = echo_init,
    .handle = echo_handle,
    .teardown = NULL,
};

const wh_handler_descriptor *wh_handler_entry(void) { return &DESCRIPTOR; }
