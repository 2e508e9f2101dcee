"""What RunPod load-balancing users write today: a FastAPI app on uvicorn with a /ping route and
one echo route, as RunPod's load-balancing guide shows. For lb-bench; PORT picks the port."""

import os

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

app = FastAPI()


@app.get("/ping")
async def ping():
    return {"status": "healthy"}


@app.post("/echo")
async def echo(request: Request):
    return JSONResponse(await request.json())


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ["PORT"]), log_level="warning")
