"""`distill deploy`, `serve`, `teacher` and `build-student`: Prefect deployments and a task's offline parts."""

from __future__ import annotations

import json
import time

import click

from pipeline.cli.common import EXIT_BAD_INPUT, CliError
from pipeline.core.task import Task, TaskError, load_task


@click.command()
@click.option("--cpu-pool", default="cpu", show_default=True)
@click.option("--gpu-pool", default="gpu", show_default=True)
@click.option("--cron", default=None, help="Also register `distill/nightly`, a recurring series on this schedule "
              "(e.g. '0 2 * * *').")
@click.option("--gpus", default=1, show_default=True,
              help="GPUs the gpu pool has: the global limit a GPU stage takes compute.num_gpus slots of.")
def deploy(cpu_pool: str, gpu_pool: str, cron: str | None, gpus: int) -> None:
    """Register the deployments with the Prefect server at PREFECT_API_URL (pools and the GPU limit too)."""
    from pipeline.flows.deploy import deploy_all

    for name in deploy_all(cpu_pool, gpu_pool, cron, gpus):
        click.echo(f"deployed {name}")
    click.echo(f"start workers: prefect worker start --pool {cpu_pool}   and   prefect worker start --pool {gpu_pool}")


@click.command()
@click.option("--gpu-pool", default="gpu", show_default=True, help="The name GPU stage deployments get.")
@click.option("--cron", default=None, help="Also serve `distill/nightly` on this schedule.")
def serve(gpu_pool: str, cron: str | None) -> None:
    """Serve every deployment from this one process (a single machine; no work pools needed)."""
    from pipeline.flows.deploy import serve_all

    serve_all(gpu_pool, cron)


def _task(name: str) -> Task:
    try:
        return load_task(name)
    except TaskError as exc:
        raise CliError(f"--task: {exc}", EXIT_BAD_INPUT) from None


@click.command()
@click.option("--task", "task_name", default="toy", show_default=True, help="The task whose teacher to serve.")
@click.option("--options", default="{}", help="The teacher's options as JSON (the recipe's teacher.builtin).")
def teacher(task_name: str, options: str) -> None:
    """Serve a task's built-in teacher over the OpenAI chat-completions protocol until Ctrl-C."""
    task = _task(task_name)
    if task.teacher_options is None:
        raise CliError(f"task '{task.name}' has no built-in teacher", EXIT_BAD_INPUT)
    try:
        opts = task.teacher_options.model_validate(json.loads(options))
    except ValueError as exc:
        raise CliError(f"--options: {exc}", EXIT_BAD_INPUT) from None
    with task.serve_teacher(opts) as url:
        click.echo(f"{task.name} teacher on {url} (Ctrl-C stops it)", err=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


@click.command("build-student")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--task", "task_name", default="toy", show_default=True, help="The task whose texts train the tokenizer.")
@click.option("--corpus-size", default=2000, show_default=True, help="Texts to train the tokenizer on.")
def build_student(out_dir: str, task_name: str, corpus_size: int) -> None:
    """Build the tiny offline student (BPE tokenizer + small Llama) into OUT_DIR."""
    from pipeline.train.student import build_student as build

    texts = _task(task_name).corpus(corpus_size, 0)
    if not texts:
        raise CliError(f"task '{task_name}' has no corpus to train a tokenizer on", EXIT_BAD_INPUT)
    click.echo(f"tiny student saved to {build(out_dir, texts)}")
