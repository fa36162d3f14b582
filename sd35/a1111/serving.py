"""AUTOMATIC1111 requests on sd35's engine: the same queue, batches and limits as the OpenAI routes.

A txt2img or img2img request becomes ``n_iter`` engine jobs of ``batch_size``
images (image i of the request has seed + i, as in AUTOMATIC1111), queued like
any OpenAI request and batched with them. The iterations run one after another,
as in AUTOMATIC1111: ``skip`` ends the current one and the next one starts, and
other callers' work is not held up behind a long request. What AUTOMATIC1111 keeps as global
state is kept per API key here, so that callers sharing the server do not see
or stop each other's work: the ``sd_model_checkpoint`` option, and the running
requests that ``progress`` reports and ``interrupt`` / ``skip`` end. With
authentication off there is one caller, as with AUTOMATIC1111 itself. With
``WORKERS`` > 1 that state is on a board every worker shares
(:mod:`sd35.a1111.board`), so a client's ``progress`` or ``interrupt`` works
whichever worker it reaches.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from dataclasses import astuple, dataclass, field
from typing import Any

import numpy as np

from sd35 import metrics
from sd35.a1111 import translate
from sd35.a1111.board import Board, Command
from sd35.a1111.protocol import (
    Img2ImgRequest,
    LatentUpscalerModeItem,
    LoraItem,
    Options,
    ProgressResponse,
    ProgressState,
    SamplerItem,
    SchedulerItem,
    ScriptsList,
    SDModelItem,
    SDVaeItem,
    Txt2ImgRequest,
    UpscalerItem,
)
from sd35.engine import GenerationParams
from sd35.engine.worker import Job, JobProgress
from sd35.errors import QueueFullError, RequestTimeoutError
from sd35.imaging import b64encode, encode_image
from sd35.logs import KEY_NAME
from sd35.serving import ImageServing

# How often a later iteration that found the queue full tries again.
_REQUEUE_SECONDS = 0.1
# How often a worker with AUTOMATIC1111 requests running publishes them to the board and reads the other
# workers' interrupts and skips; a snapshot older than _FRESH_SECONDS is of a worker that stopped (long enough
# that a busy worker's late round is not taken for one).
_SYNC_SECONDS = 0.2
_FRESH_SECONDS = 5.0

logger = logging.getLogger(__name__)


def _png_b64(pixels: np.ndarray) -> bytes:
    return b64encode(encode_image(pixels, "png"))


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def images_body(images: list[bytes], parameters: dict[str, Any], info: str) -> bytes:
    """``{"images": [...], "parameters": {...}, "info": "..."}`` with the base64 spliced in as it is."""
    parts = [b'{"images":[']
    for index, b64 in enumerate(images):
        parts += [b',"' if index else b'"', b64, b'"']
    parts += [b'],"parameters":', _dumps(parameters), b',"info":', _dumps(info), b"}"]
    return b"".join(parts)


@dataclass
class _Run:
    """One txt2img / img2img request of a caller, while it is being answered."""

    kind: str
    timestamp: str
    planned: list[GenerationParams]
    # The engine jobs of the iterations submitted so far (one at a time).
    jobs: list[Job] = field(default_factory=list)
    # Jobs that interrupt dropped from the queue before they ran: answered with no images.
    dropped: set[int] = field(default_factory=set)
    interrupted: bool = False
    skipped: bool = False
    started: float = field(default_factory=time.monotonic)

    def unrun(self) -> int:
        """Iterations that an interrupt kept from ever being submitted."""
        return len(self.planned) - len(self.jobs) if self.interrupted else 0

    def never_queued(self) -> int:
        """Images of iterations never submitted (refused, interrupted, given up) or dropped from the queue."""
        unsubmitted = sum(params.num_images for params in self.planned[len(self.jobs) :])
        return unsubmitted + sum(job.params.num_images for job in self.jobs if id(job) in self.dropped)


class A1111Serving:
    """The AUTOMATIC1111 surface of one worker: options, listings, generation, progress, interrupt."""

    def __init__(self, serving: ImageServing, board: Board) -> None:
        self.serving = serving
        self.settings = serving.settings
        self.engine = serving.engine
        self.board = board
        self._runs: dict[str, list[_Run]] = {}
        # The board's commands seen so far: those posted before this worker's first AUTOMATIC1111 request
        # concern requests it never had.
        self._last_command = board.last_command()
        self._syncer: asyncio.Task[None] | None = None

    # --- options and listings ---------------------------------------------------

    def _checkpoint(self) -> str:
        return self.board.checkpoint(KEY_NAME.get()) or translate.base_checkpoint(self.settings).title

    def options(self) -> Options:
        return Options(sd_model_checkpoint=self._checkpoint())

    def set_options(self, options: dict[str, Any]) -> None:
        """Only ``sd_model_checkpoint`` changes anything; other settings are accepted and ignored."""
        name = options.get("sd_model_checkpoint")
        if name is not None:
            checkpoint = translate.find_checkpoint(self.settings, name, "sd_model_checkpoint")
            self.board.set_checkpoint(KEY_NAME.get(), checkpoint.title)

    def sd_models(self) -> list[SDModelItem]:
        """The one checkpoint: the base model (adapters are LoRAs, see :meth:`loras`)."""
        base = translate.base_checkpoint(self.settings)
        item = SDModelItem(
            title=base.title, model_name=base.model_name, hash=None, sha256=None, filename=base.filename, config=None
        )
        return [item]

    def loras(self) -> list[LoraItem]:
        return [LoraItem(name=a.name, alias=a.name, path=a.location, metadata={}) for a in self.settings.lora_adapters]

    @staticmethod
    def samplers() -> list[SamplerItem]:
        return [SamplerItem(name=translate.SAMPLER, aliases=translate.SAMPLER_ALIASES, options={})]

    @staticmethod
    def schedulers() -> list[SchedulerItem]:
        return [
            SchedulerItem(
                name=translate.SCHEDULER,
                label=translate.SCHEDULER_LABEL,
                aliases=None,
                default_rho=-1,
                need_inner_model=False,
            )
        ]

    @staticmethod
    def upscalers() -> list[UpscalerItem]:
        """Only AUTOMATIC1111's "None": sd35 has no upscalers (and no hires fix)."""
        return [UpscalerItem(name="None", model_name=None, model_path=None, model_url=None, scale=1)]

    @staticmethod
    def latent_upscale_modes() -> list[LatentUpscalerModeItem]:
        return []

    @staticmethod
    def sd_vaes() -> list[SDVaeItem]:
        """No VAE files to choose from: the model's own VAE is always used."""
        return []

    @staticmethod
    def scripts() -> ScriptsList:
        return ScriptsList(txt2img=[], img2img=[])

    # --- generation ----------------------------------------------------------------

    async def generate(self, request: Txt2ImgRequest | Img2ImgRequest) -> bytes:
        """The JSON body of a txt2img or img2img answer, within REQUEST_TIMEOUT (decoding included)."""
        started = time.monotonic()
        deadline = self.serving.deadline()
        checkpoint = self._checkpoint()
        # The engine's settings: its batch size is the one the memory plan resolved.
        settings = self.engine.settings
        if isinstance(request, Img2ImgRequest):
            # Decoding the input and the mask is CPU work: off the event loop, on the pool edits decode on.
            plan = await self.serving.decode(deadline, translate.plan_img2img, settings, request, checkpoint)
        else:
            plan = translate.plan(settings, request, checkpoint)
        # The whole request is counted against the key's quota once, before any iteration is queued (a 429
        # then costs no GPU work), as an OpenAI request is; what is never queued is given back.
        total = sum(params.num_images for params in plan.jobs)
        self.serving.take_quota(total, asked=f"batch_size × n_iter = {total}")
        run = _Run(plan.kind, time.strftime("%Y%m%d%H%M%S"), plan.jobs)
        key = KEY_NAME.get()
        self._runs.setdefault(key, []).append(run)
        if self.board.shared and self._syncer is None:
            # A context of its own: its log lines are not this request's.
            self._syncer = asyncio.create_task(self._sync(), context=contextvars.Context())
        try:
            results = await self._run(run, deadline)
        finally:
            runs = self._runs[key]
            runs.remove(run)
            if not runs:
                del self._runs[key]
            self.serving.give_back_quota(run.never_queued())
            if self.board.shared:
                # At once: a client that polls another worker's progress until job_count is 0 goes on then.
                self._publish()
        images = [image for result in results for image in result]
        # The seeds of the images answered: an iteration interrupted before it ran has none.
        seeds = [seed for job, result in zip(plan.jobs, results, strict=True) for seed in job.seeds()[: len(result)]]
        self._describe_stops(plan, run)
        label = plan.jobs[0].adapter or self.settings.served_model_name
        metrics.IMAGES_GENERATED.labels(model=label).inc(len(images))
        encoded: list[bytes] = []
        if request.send_images is not False:
            pngs = asyncio.gather(*(self.serving.offload(_png_b64, pixels) for pixels in images))
            encoded = list(await self.serving.within(deadline, pngs))
        metrics.KEY_REQUEST_SECONDS.labels(key=key).observe(time.monotonic() - started)
        return images_body(encoded, translate.parameters(request), translate.info(plan, seeds, run.timestamp))

    async def _run(self, run: _Run, deadline: float) -> list[list[np.ndarray]]:
        """The iterations' images, queued one after another (one dropped or never run gives none);
        giving up (timeout, queue full, client gone) drops the rest."""
        loop = asyncio.get_running_loop()
        results: list[list[np.ndarray]] = []
        try:
            for params in run.planned:
                if run.interrupted:
                    results.append([])
                    continue
                job = await self._submit(run, params, deadline)
                if job is None:  # interrupted while it waited for room in the queue
                    results.append([])
                    continue
                run.jobs.append(job)
                try:
                    results.append(await self.engine.result(job, max(deadline - loop.time(), 0.001)))
                except RequestTimeoutError:
                    # The request's REQUEST_TIMEOUT, not what was left of it for this iteration.
                    raise self.serving.timed_out() from None
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if id(job) in run.dropped and not (task is not None and task.cancelling()):
                        results.append([])
                        continue
                    raise
        except BaseException:
            # Timed out, refused (queue full) or the client left: nobody wants the rest.
            for job in run.jobs:
                self.engine.abandon(job)
            raise
        return results

    async def _submit(self, run: _Run, params: GenerationParams, deadline: float) -> Job | None:
        """Queue an iteration; ``None`` when an interrupt came first.

        The first iteration is refused with a 429 when the queue is full, as any request is. A later one
        waits for room instead, until REQUEST_TIMEOUT: the request's quota is counted and its earlier
        iterations' GPU work is done, and a 429 now would throw that away.
        """
        if not run.jobs:
            return self.serving.submit(params)
        loop = asyncio.get_running_loop()
        while not run.interrupted:
            try:
                return self.engine.submit(params)
            except QueueFullError:
                if loop.time() >= deadline:
                    raise self.serving.timed_out() from None
                await asyncio.sleep(min(_REQUEUE_SECONDS, max(deadline - loop.time(), 0)))
        return None

    def _describe_stops(self, plan: translate.Plan, run: _Run) -> None:
        """Say in ``info`` how an interrupt or skip ended the request."""
        notes = []
        for job in run.jobs:
            if id(job) in run.dropped:
                continue
            progress = self.engine.progress(job)
            if progress.steps_done < progress.steps_total:
                notes.append(f"after {progress.steps_done} of {progress.steps_total} steps")
        unrun = len(run.dropped) + run.unrun()
        if unrun:
            notes.append(f"{unrun} iteration{'s' if unrun > 1 else ''} not run")
        if notes:
            plan.extra["Interrupted" if run.interrupted else "Skipped"] = "; ".join(notes)

    # --- progress, interrupt, skip -------------------------------------------------------

    def progress(self) -> ProgressResponse:
        """The caller's requests, on every worker: the running job's denoising steps, and every job not yet
        answered."""
        key = KEY_NAME.get()
        runs = [self._snapshot(run) for run in self._runs.get(key, [])]
        if self.board.shared:
            runs += self.board.others(key, fresh_within=_FRESH_SECONDS)
        states = [JobProgress(*state) for run in runs for state in run["states"]]
        if not states:
            idle = ProgressState(
                skipped=False,
                interrupted=False,
                stopping_generation=False,
                job="",
                job_count=0,
                job_timestamp="0",
                job_no=0,
                sampling_step=0,
                sampling_steps=0,
            )
            return ProgressResponse(progress=0, eta_relative=0, state=idle)
        done = sum(state.state == "done" for state in states)
        running = [state for state in states if state.state == "running"]
        queued = [state for state in states if state.state == "queued"]
        fraction = (done + sum(s.steps_done / s.steps_total for s in running if s.steps_total)) / len(states)
        per_step = next((s.elapsed / s.steps_done for s in running if s.steps_done), None)
        if per_step is None:
            eta = sum(s.images for s in running + queued) * self.engine.seconds_per_image
        else:
            # The caller's running jobs share one call; each queued one is counted as a call of its own.
            left = max((s.steps_total - s.steps_done for s in running), default=0)
            eta = (left + sum(s.steps_total for s in queued)) * per_step
        current = running[0] if running else (queued[0] if queued else states[-1])
        state = ProgressState(
            skipped=any(run["skipped"] for run in runs),
            interrupted=any(run["interrupted"] for run in runs),
            stopping_generation=False,
            job=f"scripts_{runs[0]['kind']}",
            job_count=len(states),
            job_timestamp=runs[0]["timestamp"],
            job_no=done,
            sampling_step=current.steps_done,
            sampling_steps=current.steps_total,
        )
        return ProgressResponse(progress=min(fraction, 1.0), eta_relative=round(eta, 3), state=state)

    def _snapshot(self, run: _Run) -> dict[str, Any]:
        """A request as ``progress`` reads it, here or (as JSON on the board) on another worker."""
        return {
            "kind": run.kind,
            "timestamp": run.timestamp,
            "skipped": run.skipped,
            "interrupted": run.interrupted,
            "states": [astuple(state) for state in self._states(run)],
        }

    def _states(self, run: _Run) -> list[JobProgress]:
        """Each iteration's progress: submitted ones from the engine, later ones as queued."""
        states = [self.engine.progress(job) for job in run.jobs]
        if not run.interrupted:
            later = run.planned[len(run.jobs) :]
            states += [JobProgress("queued", 0, p.denoising_steps(), 0.0, p.num_images) for p in later]
        return states

    def interrupt(self) -> None:
        """End the caller's requests, on every worker: running jobs at their next step with what was made, the
        rest unrun."""
        for run in self._runs.get(KEY_NAME.get(), []):
            self._interrupt(run)
        if self.board.shared:
            self.board.post(KEY_NAME.get(), "interrupt")

    def skip(self) -> None:
        """End the caller's running jobs, on every worker, at their next step; their requests' later iterations
        still run."""
        for run in self._runs.get(KEY_NAME.get(), []):
            self._skip(run)
        if self.board.shared:
            self.board.post(KEY_NAME.get(), "skip")

    def _interrupt(self, run: _Run) -> None:
        run.interrupted = True
        for job in run.jobs:
            if self.engine.progress(job).state != "done" and self.engine.end_early(job):
                run.dropped.add(id(job))

    def _skip(self, run: _Run, asked: float | None = None) -> None:
        """End the run's running job; asked on another worker at ``asked``, only a job that was running then (not
        the next iteration, begun since)."""
        for job in run.jobs:
            if self.engine.progress(job).state != "running":
                continue
            if asked is None or (job.started is not None and job.started <= asked):
                run.skipped = True
                self.engine.end_early(job)

    async def _sync(self) -> None:
        """While this worker answers AUTOMATIC1111 requests: apply the interrupts and skips the other workers
        were asked, and publish the requests for their ``progress``; the last round clears them."""
        try:
            while True:
                try:
                    self._apply(self.board.commands_after(self._last_command))
                    self._publish()
                except Exception:  # the next round tries again; the requests go on regardless
                    logger.exception("AUTOMATIC1111 board: a round of sharing this worker's requests failed")
                if not self._runs:
                    return
                await asyncio.sleep(_SYNC_SECONDS)
        finally:
            self._syncer = None

    def close(self) -> None:
        """Stop sharing (the serving layer was replaced): the board's task and connection."""
        if self._syncer is not None:
            self._syncer.cancel()
        self.board.close()

    def _publish(self) -> None:
        self.board.publish({key: [self._snapshot(run) for run in runs] for key, runs in self._runs.items()})

    def _apply(self, commands: list[Command]) -> None:
        for command in commands:
            self._last_command = command.id
            for run in self._runs.get(command.key, []):
                if run.started > command.at:  # a request that began later was not meant
                    continue
                if command.action == "interrupt":
                    self._interrupt(run)
                else:
                    self._skip(run, asked=command.at)
