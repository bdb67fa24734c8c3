"""Runs whose process is gone (kill -9, OOM, a lost machine) are failed and their pool slots
freed, so a dead run never blocks the runs after it.

Every run of ours records which process executes it (host, pid, the process's start time,
and the run id, so a retry that copies its parent's tags is not mistaken for the parent).
Dagster's local run launcher cannot check a run worker's health, and a run executed by the
CLI has no daemon watching it at all, so the sensor (each tick) and `sync` (before it
starts) look at in-flight runs: a recorded process that no longer exists on this host
means the run is dead.
"""

import os
import socket

import dagster as dg
import psutil

WORKER_TAG = "embedding_assets/worker"  # "<host>|<pid>|<process start time>|<run id>"
WORKER_LOST_TAG = "embedding_assets/worker_lost"  # set on the runs failed here
IN_PROCESS_JOB_TAG = "embedding_assets/source"  # the sources' jobs (in-process executor)
IN_FLIGHT = [
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]
FINISHED = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]


def worker_tag(run_id: str) -> dict[str, str]:
    """The tag naming this process as the worker of run `run_id`."""
    started = psutil.Process().create_time()
    return {WORKER_TAG: f"{socket.gethostname()}|{os.getpid()}|{started:.3f}|{run_id}"}


def stamp_worker(instance: dg.DagsterInstance, run: dg.DagsterRun) -> None:
    """Record this process as the run's worker, for runs of the sources' jobs, which
    execute in one process. A step process of a multiprocess run (the UI's implicit asset
    job) ends after its step while the run goes on: its pid says nothing about the run."""
    if IN_PROCESS_JOB_TAG in run.tags:
        instance.add_run_tags(run.run_id, worker_tag(run.run_id))


def worker_gone(run: dg.DagsterRun) -> str | None:
    """Why the run's recorded process is gone, or None when it lives or cannot be checked
    from here (another host, no record yet, a record copied from another run)."""
    value = run.tags.get(WORKER_TAG)
    if not value:
        return None
    host, pid, started, run_id = value.split("|", 3)
    if host != socket.gethostname() or run_id != run.run_id:
        return None
    try:
        process = psutil.Process(int(pid))
        alive = abs(process.create_time() - float(started)) < 1.0
        alive = alive and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        alive = False
    return None if alive else f"its process {pid} on {host} is gone (killed or crashed)"


def fail_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Fail in-flight runs whose process is gone and free every pool slot that a finished
    run still holds; returns the ids of the runs failed."""
    failed = []
    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=IN_FLIGHT)):
        run = record.dagster_run
        reason = worker_gone(run)
        if reason is None:
            continue
        instance.add_run_tags(run.run_id, {WORKER_LOST_TAG: "true"})
        instance.report_run_failed(
            run, f"embedding_assets: run failed because {reason}; its pool slots are freed"
        )
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        failed.append(run.run_id)
    free_finished_runs_slots(instance)
    return failed


def free_finished_runs_slots(instance: dg.DagsterInstance) -> list[str]:
    """Slots still claimed by finished runs (the daemon frees them after
    `free_slots_after_run_end_seconds`; a CLI sync has no daemon)."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return []
    run_ids = storage.get_concurrency_run_ids()
    if not run_ids:
        return []
    finished = instance.get_run_records(
        filters=dg.RunsFilter(run_ids=list(run_ids), statuses=FINISHED)
    )
    for record in finished:
        storage.free_concurrency_slots_for_run(record.dagster_run.run_id)
    return [r.dagster_run.run_id for r in finished]
