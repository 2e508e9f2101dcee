// An echo handler for worker-host, in Go: takes {"text": ...} and returns it.
//
// The descriptor and the exported wh_handler_entry are C, in entry.c: a Go file with //export
// directives may only declare C in its preamble, and Go cannot call the host's callbacks (C
// function pointers) itself, so entry.c has a small caller for each.
package main

/*
#cgo CFLAGS: -I${SRCDIR}
#include "worker_host.h"

void wh_go_log(const wh_host_api *host, wh_call *call, wh_log_level level, const char *message, size_t len);
wh_status wh_go_set_output(const wh_host_api *host, wh_call *call, const char *json, size_t len);
wh_status wh_go_set_error(const wh_host_api *host, wh_call *call, const char *type, size_t type_len, const char *message, size_t message_len);
*/
import "C"

import (
	"encoding/json"
	"unsafe"
)

// Input is the job's `input`.
type Input struct {
	Text string `json:"text"`
}

// Output is the job's output.
type Output struct {
	Text string `json:"text"`
}

// cBytes passes a Go byte slice to C for the duration of one call: the host copies it.
func cBytes(bytes []byte) (*C.char, C.size_t) {
	if len(bytes) == 0 {
		return nil, 0
	}
	return (*C.char)(unsafe.Pointer(&bytes[0])), C.size_t(len(bytes))
}

func fail(call *C.wh_call, host *C.wh_host_api, errorType string, message string) C.wh_status {
	typePtr, typeLen := cBytes([]byte(errorType))
	messagePtr, messageLen := cBytes([]byte(message))
	C.wh_go_set_error(host, call, typePtr, typeLen, messagePtr, messageLen)
	return C.WH_STATUS_ERROR
}

//export goInit
func goInit(call *C.wh_call, host *C.wh_host_api, config *C.char, configLen C.size_t) C.wh_status {
	// config is the JSON given with --handler-config ({} by default): C.GoStringN(config, C.int(configLen)).
	// Load your model here: this runs once, before the first job.
	message, length := cBytes([]byte("{{name}} ready"))
	C.wh_go_log(host, call, C.WH_LOG_INFO, message, length)
	return C.WH_STATUS_OK
}

//export goHandle
func goHandle(call *C.wh_call, host *C.wh_host_api, job *C.wh_job) C.wh_status {
	// The job's strings are borrowed C memory, valid until this returns: GoBytes copies.
	raw := C.GoBytes(unsafe.Pointer(job.input_json), C.int(job.input_json_len))
	var input Input
	if err := json.Unmarshal(raw, &input); err != nil {
		return fail(call, host, "ValueError", "the input is not {\"text\": string}: "+err.Error())
	}
	output, err := json.Marshal(Output{Text: input.Text})
	if err != nil {
		return fail(call, host, "EncodeError", err.Error())
	}
	pointer, length := cBytes(output)
	return C.wh_go_set_output(host, call, pointer, length)
}

// A c-shared library needs a main package; its main never runs.
func main() {}
