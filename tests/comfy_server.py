"""Run a real ComfyUI server (``main.py``) in a subprocess for end-to-end tests.

Standard library only. Usage::

    with ComfyServer(comfyui_path, models_dir=models_dir) as srv:
        assert not srv.missing_nodes(["KSampler", "AFAEnsembleLoader"])
        entry = srv.run(api_prompt, timeout=300)       # queue + wait
        images = srv.output_images(entry)

The server gets temporary output/input/user/temp directories, an
extra_model_paths.yaml pointing ``checkpoints``/``afa``/``vae``/``loras``/``diffusion_models``/``text_encoders`` at
``models_dir``, and this pack installed as ``custom_nodes/ComfyUI-AFA`` (a
symlink to the repo, created only if absent and removed afterwards; an existing
symlink to another checkout is re-pointed for the duration and restored). With
``--disable-all-custom-nodes --whitelist-custom-nodes ComfyUI-AFA`` (when the
ComfyUI version has them) no other custom node pack is loaded. The server is
always stopped (terminate, then kill), even when start-up fails.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_NAME = "ComfyUI-AFA"


class ComfyServerError(RuntimeError):
    """The server failed to start, rejected a prompt, or a prompt failed."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _has_flag(comfyui: Path, flag: str) -> bool:
    try:
        text = (comfyui / "comfy" / "cli_args.py").read_text(encoding="utf-8")
    except OSError:
        return False
    return re.search(r"""['"]%s['"]""" % re.escape(flag), text) is not None


class ComfyServer:
    def __init__(self, comfyui_path: str | os.PathLike, models_dir: str | os.PathLike | None = None,
                 *, pack_dir: str | os.PathLike | None = REPO_ROOT, pack_name: str = PACK_NAME,
                 extra_args: Sequence[str] = (), startup_timeout: float = 240.0,
                 python: str = sys.executable, keep_tmp: bool = False,
                 env: dict[str, str] | None = None):
        self.comfyui = Path(comfyui_path).expanduser().absolute()
        if not (self.comfyui / "main.py").is_file():
            raise ComfyServerError(f"{self.comfyui} is not a ComfyUI folder (no main.py).")
        self.models_dir = Path(models_dir).absolute() if models_dir is not None else None
        self.pack_dir = Path(pack_dir).resolve() if pack_dir is not None else None
        self.pack_name = pack_name
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.python = python
        self.keep_tmp = keep_tmp
        self.env = env
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.tmp: Path | None = None
        self.log_path: Path | None = None
        self.client_id = uuid.uuid4().hex
        self._log_file = None
        self._link: Path | None = None
        self._link_created = False
        self._link_previous: str | None = None

    # ----------------------------------------------------------- lifecycle
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output_dir(self) -> Path:
        assert self.tmp is not None
        return self.tmp / "output"

    @property
    def input_dir(self) -> Path:
        assert self.tmp is not None
        return self.tmp / "input"

    def __enter__(self) -> "ComfyServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _install_pack(self) -> None:
        if self.pack_dir is None:
            return
        custom = self.comfyui / "custom_nodes"
        custom.mkdir(exist_ok=True)
        link = custom / self.pack_name
        self._link = link
        if link.is_symlink():
            if link.resolve() == self.pack_dir:
                return
            self._link_previous = os.readlink(link)   # another checkout: re-point, restore later
            link.unlink()
        elif link.exists():
            if link.resolve() == self.pack_dir:
                return
            raise ComfyServerError(
                f"{link} exists and is not a symlink to {self.pack_dir}; move it away so the "
                "tests can install this checkout of the pack.")
        link.symlink_to(self.pack_dir, target_is_directory=True)
        self._link_created = True

    def _uninstall_pack(self) -> None:
        link = self._link
        if link is None:
            return
        if self._link_created and link.is_symlink():
            link.unlink()
            if self._link_previous is not None:
                link.symlink_to(self._link_previous, target_is_directory=True)
        self._link_created = False
        self._link_previous = None

    def _write_extra_paths(self) -> Path:
        assert self.tmp is not None
        y = self.tmp / "extra_model_paths.yaml"
        lines = []
        if self.models_dir is not None:
            lines += ["afa_tests:", f"    base_path: {json.dumps(str(self.models_dir))}"]
            for sub in ("checkpoints", "afa", "vae", "loras", "diffusion_models", "text_encoders"):
                (self.models_dir / sub).mkdir(parents=True, exist_ok=True)
                lines.append(f"    {sub}: {sub}")
        else:
            lines.append("afa_tests: null")
        y.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return y

    def command(self) -> list[str]:
        assert self.tmp is not None
        cmd = [self.python, str(self.comfyui / "main.py"), "--cpu",
               "--listen", "127.0.0.1", "--port", str(self.port),
               "--output-directory", str(self.tmp / "output"),
               "--input-directory", str(self.tmp / "input"),
               "--user-directory", str(self.tmp / "user"),
               "--temp-directory", str(self.tmp),
               "--extra-model-paths-config", str(self._write_extra_paths())]
        if _has_flag(self.comfyui, "--disable-auto-launch"):
            cmd.append("--disable-auto-launch")
        if _has_flag(self.comfyui, "--disable-api-nodes"):
            cmd.append("--disable-api-nodes")
        if _has_flag(self.comfyui, "--database-url"):
            cmd += ["--database-url", "sqlite:///:memory:"]
        if _has_flag(self.comfyui, "--whitelist-custom-nodes"):
            cmd += ["--disable-all-custom-nodes", "--whitelist-custom-nodes", self.pack_name]
        return cmd + self.extra_args

    def start(self) -> "ComfyServer":
        if self.proc is not None:
            return self
        self.tmp = Path(tempfile.mkdtemp(prefix="afa-comfy-server-"))
        for sub in ("output", "input", "user"):
            (self.tmp / sub).mkdir()
        self.port = free_port()
        self.log_path = self.tmp / "comfyui.log"
        try:
            self._install_pack()
            env = dict(os.environ if self.env is None else self.env)
            env["PYTHONUNBUFFERED"] = "1"
            self._log_file = open(self.log_path, "wb")
            self.proc = subprocess.Popen(self.command(), cwd=str(self.comfyui), env=env,
                                         stdin=subprocess.DEVNULL, stdout=self._log_file,
                                         stderr=subprocess.STDOUT)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                hint = ""
                if re.search(r"comfyui_(workflow_templates|frontend_package|embedded_docs).*does not exist",
                             self.log_text()):
                    hint = ("\nHint: the installed comfyui-frontend-package / comfyui-workflow-templates "
                            "do not match this ComfyUI version: pip install -r "
                            f"{self.comfyui / 'requirements.txt'}")
                raise ComfyServerError(f"ComfyUI exited with code {self.proc.returncode} during "
                                       f"start-up.{hint}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/system_stats", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise ComfyServerError(f"ComfyUI did not answer within {self.startup_timeout:.0f}s.\n"
                               f"{self.log_tail()}")

    def stop(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=15)
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
            self._uninstall_pack()
            if self.tmp is not None and not self.keep_tmp:
                self._final_log = self.log_text()
                shutil.rmtree(self.tmp, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ----------------------------------------------------------------- HTTP
    def _request(self, method: str, path: str, data=None, timeout: float = 60.0):
        body = None
        headers = {}
        if data is not None:
            body = json.dumps(data).encode("utf-8")
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base_url + path, data=body, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def get_json(self, path: str, timeout: float = 60.0):
        return self._request("GET", path, timeout=timeout)

    def post_json(self, path: str, data, timeout: float = 60.0):
        return self._request("POST", path, data, timeout=timeout)

    def object_info(self, node: str | None = None) -> dict:
        path = "/object_info" if node is None else "/object_info/" + urllib.parse.quote(node)
        return self.get_json(path, timeout=120)

    def widget_defaults(self, node: str) -> dict:
        """The node's required widgets at their defaults (a combo: its first choice), for prompts that
        set only what they test."""
        out = {}
        for name, spec in self.object_info(node)[node]["input"]["required"].items():
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if "default" in options:
                out[name] = options["default"]
            elif isinstance(spec[0], list) and spec[0]:
                out[name] = spec[0][0]
        return out

    def missing_nodes(self, names: Iterable[str]) -> list[str]:
        info = self.object_info()
        return [n for n in names if n not in info]

    def check_nodes(self, names: Iterable[str]) -> None:
        """Raise (with the import-failure lines of the log) unless every node is registered."""
        missing = self.missing_nodes(names)
        if missing:
            failed = "\n".join(l for l in self.log_text().splitlines() if "IMPORT FAILED" in l
                               or "Cannot import" in l)
            raise ComfyServerError(f"Nodes not registered by the server: {missing}.\n"
                                   f"Import failures:\n{failed or '(none logged)'}\n{self.log_tail()}")

    def queue(self, api_prompt: dict, client_id: str | None = None) -> str:
        payload = {"prompt": api_prompt, "client_id": client_id or self.client_id}
        try:
            out = self.post_json("/prompt", payload)
        except urllib.error.HTTPError as e:  # 400: validation errors (node_errors)
            detail = e.read().decode("utf-8", "replace")
            raise ComfyServerError(f"ComfyUI rejected the prompt (HTTP {e.code}): {detail}") from None
        return out["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        h = self.get_json("/history/" + urllib.parse.quote(prompt_id))
        return (h or {}).get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 600.0, poll: float = 0.25) -> dict:
        """Wait for the prompt; return its history entry; raise with the
        execution_error message when it failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.history(prompt_id)
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("status_str") == "error":
                    raise ComfyServerError("Prompt failed: " + self._error_message(status))
                return entry
            if not self.running:
                raise ComfyServerError(f"ComfyUI exited while running the prompt.\n{self.log_tail()}")
            time.sleep(poll)
        self.interrupt()
        raise ComfyServerError(f"Prompt {prompt_id} did not finish within {timeout:.0f}s.\n"
                               f"{self.log_tail()}")

    @staticmethod
    def _error_message(status: dict) -> str:
        for event, data in status.get("messages") or []:
            if event == "execution_error":
                return (f"{data.get('node_type')} (node {data.get('node_id')}): "
                        f"{data.get('exception_type')}: {data.get('exception_message')}\n"
                        + "".join(data.get("traceback") or []))
            if event == "execution_interrupted":
                return f"interrupted at node {data.get('node_id')}"
        return json.dumps(status)

    def run(self, api_prompt: dict, timeout: float = 600.0) -> dict:
        return self.wait(self.queue(api_prompt), timeout=timeout)

    def interrupt(self) -> None:
        try:
            self.post_json("/interrupt", {})
        except Exception:  # noqa: BLE001 - best effort
            pass

    def output_images(self, entry: dict) -> list[Path]:
        """Files of every ``images`` output of a history entry."""
        paths = []
        for out in (entry.get("outputs") or {}).values():
            for img in out.get("images", []):
                base = {"output": self.output_dir, "temp": self.tmp / "temp",
                        "input": self.input_dir}.get(img.get("type", "output"), self.output_dir)
                paths.append(base / img.get("subfolder", "") / img["filename"])
        return paths

    # ------------------------------------------------------------------ logs
    def log_text(self) -> str:
        if self.log_path is not None and self.log_path.exists():
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        return getattr(self, "_final_log", "")

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_text().splitlines()[-lines:]
        return "--- ComfyUI log (tail) ---\n" + "\n".join(text)

    def import_failed(self, pack: str = PACK_NAME) -> bool:
        """True when the log says our pack (a custom_nodes folder named ``pack``) failed to import."""
        for line in self.log_text().splitlines():
            if "IMPORT FAILED" in line and re.search(r"[/\\]%s\s*$" % re.escape(pack), line):
                return True
        return False
