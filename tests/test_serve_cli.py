"""`sharelora serve` as a user starts it: flags from the settings, startup lines, a request, shutdown."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from serve_tiny import build_files, watchdog

from sharelora.serve.settings import Settings, add_arguments, settings_from_args


@pytest.fixture(autouse=True)
def _bounded():
    with watchdog(240):
        yield


def test_every_setting_is_a_flag_and_adapter_repeats():
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--model", "m", "--adapter", "a=x", "--adapter", "multi/", "--max-batch", "4",
                         "--api-key", "k"])
    s = settings_from_args(args)
    assert s == Settings(model="m", adapter=["a=x", "multi/"], max_batch=4, api_key="k")
    assert s.adapter_specs() == [("a", "x"), (None, "multi/")]
    assert s.host == "127.0.0.1" and s.max_queue == 256
    flags = {a.dest for a in p._actions}
    assert set(Settings.model_fields) <= flags


def test_the_serve_command_is_registered():
    from sharelora.cli import build_parser

    assert "serve" in build_parser()._subparsers._group_actions[0].choices


def test_sharelora_serve_starts_prints_its_adapters_and_answers(tmp_path):
    files = build_files(tmp_path)
    cmd = [sys.executable, "-m", "sharelora.cli", "serve", "--model", str(files["model"]), "--port", "0",
           "--adapter", str(files["multi"]), "--adapter", f"solo={files['solo']}", "--adapter",
           f"peft={files['peft']}", "--threads", "1", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    try:
        deadline = time.monotonic() + 120
        url = None
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"(http://127\.0\.0\.1:\d+)/v1 serves", line)
            url = m.group(1) if m else None
        assert url, "".join(lines)
        from openai import OpenAI

        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=2, timeout=30)
        assert [m.id for m in client.models.list().data][1:] == ["sql", "chat", "solo", "peft"]
        r = client.completions.create(model="chat", prompt="hello world", max_tokens=5, temperature=0)
        assert r.usage.completion_tokens >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    text = "".join(lines) + out
    assert re.search(r"adapter sql: sharelora-multi, task group 'default', [\d,]+ parameters", text)
    assert "[3/3] adapter peft: peft" in text
    assert re.search(r"adapter=chat prompt_tokens=\d+ completion_tokens=\d+ finish=\w+ latency=", text)
