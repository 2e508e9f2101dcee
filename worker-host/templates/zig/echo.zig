//! An echo handler for worker-host, in Zig: returns each job's input unchanged.
//!
//! `worker_host.zig` is worker_host.h translated by Zig's own C translator (recent Zig has no
//! `@cImport`; this is what it did): build.sh generates it, then builds lib{{lib}}.so.
const c = @import("worker_host.zig");

fn init(call: ?*c.wh_call, host: [*c]const c.wh_host_api, config_json: [*c]const u8, config_json_len: usize) callconv(.c) c.wh_status {
    _ = config_json;
    _ = config_json_len;
    const message = "{{name}} ready";
    host.*.log.?(call, c.WH_LOG_INFO, message, message.len);
    return c.WH_STATUS_OK;
}

fn handle(call: ?*c.wh_call, host: [*c]const c.wh_host_api, job: [*c]const c.wh_job) callconv(.c) c.wh_status {
    // The input is borrowed; set_output copies it before returning.
    return host.*.set_output.?(call, job.*.input_json, job.*.input_json_len);
}

const descriptor = c.wh_handler_descriptor{
    .struct_size = @sizeOf(c.wh_handler_descriptor),
    .abi_major = c.WH_ABI_MAJOR,
    .abi_minor = c.WH_ABI_MINOR,
    .name = "{{name}}",
    .version = "0.1.0",
    .max_concurrency = 0, // stateless, so any number of jobs at once
    .reserved0 = 0,
    .features = 0,
    .init = init,
    .handle = handle,
    .teardown = null,
};

/// The one exported symbol: `export` gives it C linkage and puts it in the dynamic symbol table.
export fn wh_handler_entry() callconv(.c) [*c]const c.wh_handler_descriptor {
    return &descriptor;
}
