"""A local HTTP server that speaks the Vertex AI REST protocol the google-genai client uses.

`VertexServer` answers generateContent and batch prediction job requests as recorded from
google-genai 2.34, with replies from its ``responder`` and faults injected by `inject` or by
``server.schedule = FaultSchedule(...)`` (support/vertex_faults.py). It counts what a quota would
see (`max_in_flight`, `max_requests_in_window`). It runs an aiohttp application on its own event
loop in a daemon thread, bound to 127.0.0.1 on a free port. Batch jobs (support/vertex_batch.py)
need ``STORAGE_EMULATOR_HOST`` pointing at a GCS emulator.

Details (protocol, usage, mechanisms): docs/architecture.md, 'Inside the rooms'.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from promptopt_dagster_tests.support.server_process import HOST, Startable
from promptopt_dagster_tests.support.vertex_batch import BatchJob
from promptopt_dagster_tests.support.vertex_faults import Fault
from promptopt_dagster_tests.support.vertex_requests import count_tokens, system_text, user_text, wants_json

Responder = Callable[[dict[str, Any]], str]
Latency = float | Callable[[dict[str, Any]], float]

_GENERATE = re.compile(
    r"^/(?P<version>v1[^/]*)/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"
    r"/publishers/google/models/(?P<model>[^/:]+):generateContent$"
)
_BATCHES = re.compile(
    r"^/(?P<version>v1[^/]*)/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"
    r"/batchPredictionJobs(?:/(?P<job>[^/]+))?$"
)


def echo_responder(body: dict[str, Any]) -> str:
    """Default replies: ``{"answer": <user text>}`` in JSON mode, else ``echo: <user text>``."""
    text = user_text(body)
    return json.dumps({"answer": text}) if wants_json(body) else f"echo: {text}"


@dataclass
class RecordedRequest:
    method: str
    path: str
    body: dict[str, Any] | None
    started: float
    finished: float = 0.0
    status: int = 0
    auth_scheme: str = ""  # "Bearer" when a token came; the token itself is not kept

    @property
    def kind(self) -> str:
        if _GENERATE.match(self.path):
            return "generate"
        return "batch" if _BATCHES.match(self.path) else "other"


class VertexServer(Startable):
    """The fake Vertex endpoint; see the module docstring. `responder(body) -> text` makes the
    model's reply; raising in it fails that request (500 online, an error line in a batch)."""

    def __init__(
        self,
        responder: Responder = echo_responder,
        latency: Latency = 0.0,
        batch_polls_before_done: int = 2,
        port: int = 0,
    ) -> None:
        self.responder = responder
        self.latency = latency
        self.batch_polls_before_done = batch_polls_before_done
        # Set to a message to make every batch job fail as a whole (JOB_STATE_FAILED).
        self.fail_batch_jobs_with: str | None = None
        self._port = port
        self.requests: list[RecordedRequest] = []
        self.jobs: dict[str, BatchJob] = {}
        self._faults: list[Fault] = []
        # Consulted for each generateContent request no injected fault matched (FaultSchedule).
        self.schedule: Callable[[dict[str, Any]], Fault | None] | None = None
        self._lock = threading.Lock()
        self._in_flight = 0
        self.max_in_flight = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self._gate: asyncio.Event | None = None
        self._job_counter = 0

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self._port}"

    def start(self) -> VertexServer:
        if self._thread is not None:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:  # reported to start()
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name="vertex-server", daemon=True)
        self._thread.start()
        if not ready.wait(timeout=30):
            raise TimeoutError("the fake Vertex server did not start within 30 s")
        if failure:
            self._thread = None
            raise RuntimeError(f"the fake Vertex server failed to start: {failure[0]!r}")
        return self

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        self._gate = asyncio.Event()
        self._gate.set()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, self._port, backlog=1024, reuse_address=True)
        await site.start()
        self._port = int(self._runner.addresses[0][1])

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def stop(self) -> None:
        """Release held requests, close the listener and join the thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if self._stopping is not None:
            loop.call_soon_threadsafe(self._stopping.set)
        if self._gate is not None:
            loop.call_soon_threadsafe(self._gate.set)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        self._thread = None

    # --- test controls -------------------------------------------------------------------------

    def inject(self, *faults: Fault) -> None:
        with self._lock:
            self._faults.extend(faults)

    def clear(self) -> None:
        """Forget recorded requests, faults and the in-flight maximum."""
        with self._lock:
            self.requests.clear()
            self._faults.clear()
            self.max_in_flight = 0

    def hold(self) -> None:
        """From now on, generateContent requests are received (and counted in flight) but not
        answered until `release`: a test can see how many a client keeps in flight at once."""
        self._call_in_loop(lambda gate: gate.clear())

    def release(self) -> None:
        """Answer the held requests, and the next ones as they come."""
        self._call_in_loop(lambda gate: gate.set())

    def _call_in_loop(self, action: Callable[[asyncio.Event], None]) -> None:
        loop, gate = self._loop, self._gate
        if loop is None or gate is None:
            raise RuntimeError("the fake Vertex server is not running; call start() first")
        done = threading.Event()

        def apply() -> None:
            action(gate)
            done.set()

        loop.call_soon_threadsafe(apply)
        if not done.wait(timeout=10):
            raise TimeoutError("the fake Vertex server's loop did not answer within 10 s")

    @property
    def in_flight(self) -> int:
        """generateContent requests received and not yet answered."""
        with self._lock:
            return self._in_flight

    def max_requests_in_window(self, window_s: float) -> int:
        """The most generateContent requests that arrived within any `window_s` seconds: what a
        per-minute quota (with window_s=60) would have counted at its worst."""
        starts = sorted(r.started for r in self.generate_requests())
        most, first = 0, 0
        for last, started in enumerate(starts):
            while started - starts[first] >= window_s:
                first += 1
            most = max(most, last - first + 1)
        return most

    def generate_requests(self) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.kind == "generate"]

    def _take_fault(self, body: dict[str, Any]) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.times is not None and fault.times <= 0:
                    continue
                if fault.when is not None and not fault.when(body):
                    continue
                if fault.times is not None:
                    fault.times -= 1
                return fault
        return None

    # --- HTTP ----------------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            body = None
        auth = request.headers.get("Authorization", "")
        record = RecordedRequest(
            request.method,
            request.path,
            body,
            time.monotonic(),
            auth_scheme=auth.split(" ", 1)[0] if auth else "",
        )
        with self._lock:
            self.requests.append(record)
        try:
            response = await self._route(request, body or {}, auth)
        except Exception as exc:  # a bug here must show up as a 500 the test can read
            response = _error(500, f"fake server error: {exc!r}", "INTERNAL")
        record.finished = time.monotonic()
        record.status = response.status
        return response

    async def _route(self, request: web.Request, body: dict[str, Any], auth: str) -> web.StreamResponse:
        if request.method == "POST" and (m := _GENERATE.match(request.path)):
            return await self._generate(m.group("model"), body, auth)
        if m := _BATCHES.match(request.path):
            if request.method == "POST" and not m.group("job"):
                return await self._create_job(m, body)
            if request.method == "GET" and m.group("job"):
                return self._get_job(m)
        return _error(404, f"no such endpoint: {request.method} {request.path}", "NOT_FOUND")

    async def _generate(self, model: str, body: dict[str, Any], auth: str) -> web.StreamResponse:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if self._gate is not None:
                await self._gate.wait()
            delay = self.latency(body) if callable(self.latency) else self.latency
            if delay > 0:
                await asyncio.sleep(delay)
            fault = self._take_fault(body)
            if fault is None and self.schedule is not None:
                fault = self.schedule(body)
            if fault is not None and fault.kind == "hang":
                assert self._stopping is not None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), fault.hang_s)
                return _error(503, "released from a hang", "UNAVAILABLE")
            if fault is not None and fault.kind == "status":
                headers = {"Retry-After": _format_seconds(fault.retry_after)} if fault.retry_after else {}
                message = fault.message.replace("{authorization}", auth)
                return _error(fault.status, message, _STATUS_NAMES.get(fault.status, "UNKNOWN"), headers)
            if fault is not None and fault.kind == "malformed_json":
                return web.Response(
                    text='{"candidates": [{"content": {"parts": [{"te', content_type="application/json"
                )
            try:
                text = self.responder(body)
            except Exception as exc:
                return _error(500, f"responder failed: {exc}", "INTERNAL")
            if fault is not None and fault.kind == "non_json_reply":
                text = "Sure! Here is my answer, in prose rather than JSON."
            return web.json_response(_reply(model, body, text))
        finally:
            with self._lock:
                self._in_flight -= 1

    async def _create_job(self, match: re.Match[str], body: dict[str, Any]) -> web.StreamResponse:
        with self._lock:
            self._job_counter += 1
            job_id = str(1000 + self._job_counter)
        project, location = match.group("project"), match.group("location")
        try:
            job = BatchJob.from_request(
                f"projects/{project}/locations/{location}/batchPredictionJobs/{job_id}", body
            )
        except ValueError as exc:
            return _error(400, str(exc), "INVALID_ARGUMENT")
        self.jobs[job_id] = job
        loop = asyncio.get_running_loop()
        loop.run_in_executor(None, job.run, self._answer, self.fail_batch_jobs_with)
        return web.json_response(job.resource())

    def _get_job(self, match: re.Match[str]) -> web.StreamResponse:
        job = self.jobs.get(match.group("job") or "")
        if job is None:
            return _error(404, f"batch job {match.group('job')} not found", "NOT_FOUND")
        job.poll(self.batch_polls_before_done)
        return web.json_response(job.resource())

    def _answer(self, model: str, request: dict[str, Any]) -> dict[str, Any]:
        """A batch line's generateContent response, from the responder."""
        return _reply(model, request, self.responder(request))


_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def _format_seconds(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


def _error(status: int, message: str, name: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"code": status, "message": message, "status": name}}
    return web.json_response(body, status=status, headers=headers)


def _reply(model: str, body: dict[str, Any], text: str) -> dict[str, Any]:
    prompt = system_text(body) + "".join(
        part.get("text", "") for c in body.get("contents", []) for part in c.get("parts", [])
    )
    prompt_tokens, completion_tokens = count_tokens(prompt), count_tokens(text)
    return {
        "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP"}],
        "usageMetadata": {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": completion_tokens,
            "totalTokenCount": prompt_tokens + completion_tokens,
        },
        "modelVersion": model,
    }
