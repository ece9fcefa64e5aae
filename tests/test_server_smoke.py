"""A real ComfyUI server starts with the pack installed, answers, runs a prompt, and stops."""
import os
import socket

import pytest

from comfy_server import PACK_NAME, ComfyServer, ComfyServerError



def _port_open(port):
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _txt2img_prompt(ckpt_name, steps=1, size=64):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a lighthouse"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 0, "steps": steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "afa_smoke"}},
    }


@pytest.mark.comfyui
def test_server_starts_answers_and_stops(comfyui_path, models_dir):
    link = comfyui_path / "custom_nodes" / PACK_NAME
    existed = os.path.lexists(link)
    srv = ComfyServer(comfyui_path, models_dir=models_dir)
    with srv:
        assert srv.running
        info = srv.object_info()
        assert "KSampler" in info and "CheckpointLoaderSimple" in info
        assert srv.missing_nodes(["KSampler", "SaveImage", "NoSuchNode_AFA"]) == ["NoSuchNode_AFA"]
        srv.check_nodes(["KSampler", "VAEDecode"])
        with pytest.raises(ComfyServerError, match="NoSuchNode_AFA"):
            srv.check_nodes(["NoSuchNode_AFA"])
        assert os.path.islink(link) or os.path.isdir(link)   # pack installed for the run
        assert isinstance(srv.import_failed(), bool)
        port = srv.port
    assert not srv.running and srv.proc.returncode is not None
    assert not _port_open(port)
    assert os.path.lexists(link) == existed               # removed only if we created it
    assert srv.tmp is not None and not srv.tmp.exists()   # temp dirs cleaned up
    assert "Starting server" in srv.log_text()


@pytest.mark.comfyui
def test_server_runs_a_txt2img_prompt_and_reports_errors(comfy_server, sd15_checkpoints,
                                                         sdxl_checkpoints):
    srv = comfy_server
    entry = srv.run(_txt2img_prompt(sd15_checkpoints[0].name), timeout=300)
    images = srv.output_images(entry)
    assert len(images) == 1 and images[0].is_file() and images[0].stat().st_size > 0

    bad = _txt2img_prompt("no_such_checkpoint.safetensors")
    with pytest.raises(ComfyServerError, match="rejected the prompt"):
        srv.queue(bad)

    # A UNet-only checkpoint has no VAE: ComfyUI fails at run time -> execution_error message.
    no_vae = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sdxl_checkpoints[0].name}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "afa_smoke"}},
    }
    with pytest.raises(ComfyServerError, match="VAEDecode.*VAE is invalid"):
        srv.run(no_vae, timeout=300)


@pytest.mark.comfyui
def test_server_start_failure_is_reported_and_cleaned_up(comfyui_path, models_dir):
    srv = ComfyServer(comfyui_path, models_dir=models_dir, extra_args=["--no-such-flag"],
                      startup_timeout=60)
    with pytest.raises(ComfyServerError, match="exited with code"):
        srv.start()
    assert not srv.running
    assert "--no-such-flag" in srv.log_text()


def test_log_parsing_without_comfyui(tmp_path):
    """import_failed / error messages, on a fake ComfyUI folder (no server started)."""
    (tmp_path / "main.py").write_text("")
    srv = ComfyServer(tmp_path)
    srv.log_path = tmp_path / "log.txt"
    srv.log_path.write_text(
        "Import times for custom nodes:\n"
        "   0.0 seconds: /x/ComfyUI/custom_nodes/websocket_image_save.py\n"
        "   0.1 seconds (IMPORT FAILED): /x/ComfyUI/custom_nodes/ComfyUI-AFA-old\n")
    assert not srv.import_failed()
    assert srv.import_failed("ComfyUI-AFA-old")
    with srv.log_path.open("a") as f:
        f.write("   0.2 seconds (IMPORT FAILED): /x/ComfyUI/custom_nodes/ComfyUI-AFA\n")
    assert srv.import_failed()
    status = {"status_str": "error", "messages": [
        ["execution_start", {}],
        ["execution_error", {"node_type": "VAEDecode", "node_id": "3", "exception_type": "RuntimeError",
                             "exception_message": "ERROR: VAE is invalid: None", "traceback": ["tb\n"]}]]}
    msg = ComfyServer._error_message(status)
    assert msg.startswith("VAEDecode (node 3): RuntimeError: ERROR: VAE is invalid") and "tb" in msg
    with pytest.raises(ComfyServerError, match="not a ComfyUI folder"):
        ComfyServer(tmp_path / "nothing")
