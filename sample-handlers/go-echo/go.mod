module worker-host/sample-handlers/go-echo

go 1.19
