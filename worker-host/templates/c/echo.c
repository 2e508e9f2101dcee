/* An echo handler for worker-host, in C: returns each job's input unchanged. */
#include "worker_host.h"

static wh_status echo_init(wh_call *call, const wh_host_api *host, const char *config_json,
                           size_t config_json_len) {
    (void)config_json; /* the JSON given with --handler-config, {} by default */
    (void)config_json_len;
    static const char message[] = "{{name}} ready";
    host->log(call, WH_LOG_INFO, message, sizeof message - 1);
    return WH_STATUS_OK; /* load your model here: this runs once, before the first job */
}

static wh_status echo_handle(wh_call *call, const wh_host_api *host, const wh_job *job) {
    /* The input is borrowed until this returns; set_output copies it. */
    return host->set_output(call, job->input_json, job->input_json_len);
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
    .init = echo_init,
    .handle = echo_handle,
    .teardown = NULL,
};

const wh_handler_descriptor *wh_handler_entry(void) { return &DESCRIPTOR; }
