"""The /v1/jobs routes (kept out of api.py so that jobs stay one module's business)."""

# no `from __future__ import annotations`: FastAPI must see the local Caller alias
import shlex
from typing import Annotated, Any, Callable, Optional, Union

from fastapi import Depends, FastAPI
from pydantic import BaseModel, Field, field_validator

from .authz import Principal
from .jobs import MAX_EXPIRES, JobSpec, parse_max_errors
from .manager import Manager

__all__ = ["JobIn", "add_job_routes"]


class JobIn(BaseModel):
    command: Union[list[str], str] = Field(description="argv list (quoted for you) or a "
                                                       "shell command string")
    devices: list[str] = Field(default_factory=list, max_length=10000)
    filters: list[str] = Field(default_factory=list, max_length=64,
                               description="glob on the id, or KEY=GLOB on a label; any")
    all: bool = False
    max_concurrency: int = Field(default=16, ge=1, le=10000)
    max_errors: str = Field(default="0", description="N failed parts, or N% of the job's")
    expires: float = Field(default=7 * 86400, gt=0, le=MAX_EXPIRES,
                           description="seconds from now; pending parts expire then")
    timeout: Optional[float] = Field(default=None, gt=0, le=30 * 86400)

    @field_validator("max_errors")
    @classmethod
    def _max_errors(cls, v: str) -> str:
        try:
            return parse_max_errors(v, "max_errors")
        except Exception as exc:
            raise ValueError(str(exc).removeprefix("max_errors: ")) from None

    def spec(self) -> JobSpec:
        command = self.command if isinstance(self.command, str) else shlex.join(self.command)
        return JobSpec(command=command, devices=tuple(self.devices),
                       filters=tuple(self.filters), all=self.all,
                       max_concurrency=self.max_concurrency, max_errors=self.max_errors,
                       expires=self.expires, timeout=self.timeout)


def add_job_routes(app: FastAPI, manager: Manager,
                   auth: Callable[..., Principal]) -> None:
    jobs = manager.jobs
    Caller = Annotated[Principal, Depends(auth)]

    @app.post("/v1/jobs", status_code=201)
    async def create_job(body: JobIn, p: Caller) -> dict[str, Any]:
        """Start a job: each device runs the command once, now or when next online."""
        return await jobs.create(p, body.spec())

    @app.get("/v1/jobs")
    async def list_jobs(p: Caller) -> list[dict[str, Any]]:
        return await jobs.list(p)

    @app.get("/v1/jobs/{job}")
    async def show_job(job: str, p: Caller) -> dict[str, Any]:
        return await jobs.get(p, job)

    @app.post("/v1/jobs/{job}/cancel")
    async def cancel_job(job: str, p: Caller) -> dict[str, Any]:
        """Pending parts become cancelled; running ones are hung up."""
        return await jobs.cancel(p, job)

    @app.get("/v1/jobs/{job}/parts/{device}")
    async def job_part(job: str, device: str, p: Caller) -> dict[str, Any]:
        """One device's part with its output (at most 64 KiB of each stream)."""
        return await jobs.part(p, job, device)
