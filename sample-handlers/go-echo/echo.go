// The echo handler in Go: returns each job's input unchanged.
//
// Build: go build -buildmode=c-shared -o libgo_echo_handler.so .
//
// The descriptor and the exported wh_handler_entry are C, in entry.c: a file with //export
// directives may only declare C in its preamble, and the host's callbacks are C function
// pointers, which Go cannot call directly (entry.c has one small caller for each used here).
package main

/*
#cgo CFLAGS: -I${SRCDIR}/../../handler-abi/include
#include "worker_host.h"

void wh_go_log(const wh_host_api *host, wh_call *call, wh_log_level level, const char *message, size_t len);
wh_status wh_go_set_output(const wh_host_api *host, wh_call *call, const char *json, size_t len);
*/
import "C"

import "unsafe"

//export goEchoInit
func goEchoInit(call *C.wh_call, host *C.wh_host_api, config *C.char, configLen C.size_t) C.wh_status {
	message := []byte("go echo handler ready")
	// A Go pointer may be passed to C for the duration of a call: the host copies the line.
	C.wh_go_log(host, call, C.WH_LOG_INFO, (*C.char)(unsafe.Pointer(&message[0])), C.size_t(len(message)))
	return C.WH_STATUS_OK
}

//export goEchoHandle
func goEchoHandle(call *C.wh_call, host *C.wh_host_api, job *C.wh_job) C.wh_status {
	// The input is borrowed C memory; set_output copies it before returning.
	return C.wh_go_set_output(host, call, job.input_json, job.input_json_len)
}

// A c-shared library needs a main package; its main never runs.
func main() {}
