"""`python -m afa_nodes studio`: boot ComfyUI as a library and serve AFA Studio on 127.0.0.1.

    python -m afa_nodes studio [--port 7860] [--share] [--comfyui PATH] [--demo [FOLDER]]

Models come from ComfyUI's folders: models/checkpoints, models/afa and the entries of
<ComfyUI>/extra_model_paths.yaml (plus --extra-model-paths-config files), as ComfyUI's
main.py reads them. `--demo` adds three small synthetic checkpoints (built once, random
weights) so a first run can press Generate at once. No public link unless --share is given. Ctrl-C (or SIGTERM) stops the
server; a running training is stopped first, which leaves a resumable file.
"""
import argparse
import importlib.util
import os
import signal

from .. import logger
from ..core.errors import AFAError

EXIT_ERROR = 2
STOP_WAIT_SECONDS = 600


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1 (default 7860)")
    parser.add_argument("--share", action="store_true",
                        help="ALSO create a public gradio.live link (off by default: local only)")
    parser.add_argument("--comfyui", default=None, metavar="PATH",
                        help="ComfyUI folder (default: $COMFYUI_PATH, the one this pack is installed in, "
                             "~/comfy/ComfyUI)")
    parser.add_argument("--extra-model-paths-config", action="append", default=[], metavar="YAML",
                        help="more model folders, as ComfyUI's flag of that name (repeatable)")
    parser.add_argument("--input-directory", default=None, metavar="DIR",
                        help="ComfyUI's input directory (training datasets are its subfolders)")
    parser.add_argument("--output-directory", default=None, metavar="DIR",
                        help="ComfyUI's output directory (images go to its afa_studio/ subfolder)")
    parser.add_argument("--demo", nargs="?", const="", default=None, metavar="FOLDER",
                        help="also list three synthetic demo checkpoints (random weights, ~290 MB each, built "
                             "once into FOLDER, default ~/.cache/comfyui-afa/demo-checkpoints)")
    parser.add_argument("--cache-checkpoints", type=int, default=None, metavar="N",
                        help="loaded checkpoints kept in memory across requests (default 6: one full ensemble)")


def run(args) -> int:
    if importlib.util.find_spec("gradio") is None:
        logger.error("AFA Studio needs gradio 6: pip install 'gradio>=6,<7'.")
        return EXIT_ERROR
    from importlib.metadata import version
    if int(version("gradio").split(".")[0]) != 6:
        logger.error("AFA Studio needs gradio 6, this environment has gradio %s: pip install 'gradio>=6,<7' "
                     "(a separate venv keeps other tools' gradio as it is).", version("gradio"))
        return EXIT_ERROR
    try:
        return _serve(args)
    except AFAError as e:
        logger.error("%s", e)
        return EXIT_ERROR


def _serve(args) -> int:
    from ..comfy_env import boot_comfyui
    info = boot_comfyui(args.comfyui, output_dir=args.output_directory, input_dir=args.input_directory,
                        extra_model_paths=args.extra_model_paths_config)
    import folder_paths

    from ..service.models import register_afa_folder
    from .app import build_app, launch
    from .state import Studio

    from ..service.models import add_demo_checkpoints
    from .cache import DEFAULT_CAPACITY

    register_afa_folder()  # models/afa, as loading the pack in ComfyUI does
    studio = Studio(args.cache_checkpoints or DEFAULT_CAPACITY, demo_folder=args.demo or None)
    if args.demo is not None:
        names = add_demo_checkpoints(studio.demo_folder)
        logger.info("Demo checkpoints (synthetic, random weights): %s", ", ".join(names))
    demo = build_app(studio)
    outputs = os.path.join(folder_paths.get_output_directory(), "afa_studio")
    os.makedirs(outputs, exist_ok=True)
    try:
        url, public = launch(demo, port=args.port, share=args.share, allowed_paths=[outputs])
    except OSError as e:
        raise AFAError(f"cannot serve on 127.0.0.1:{args.port} ({e}); pick another --port.") from None
    logger.info("AFA Studio on %s (ComfyUI %s at %s, %s); Ctrl-C stops it.", url, info.version, info.path,
                info.device)
    if public:
        logger.warning("--share: AFA Studio is ALSO public at %s (anyone with the link can use it).", public)
    # Ctrl-C and `kill` stop cleanly. SIGINT explicitly too: a process started in the background
    # by a non-interactive shell inherits SIGINT as ignored, and Python then leaves it ignored.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        demo.block_thread()  # returns on Ctrl-C, after closing the server
    finally:
        _stop_training(studio)
        demo.close()
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _stop_training(studio):
    run = studio.training
    if run is not None and run.snapshot().active:
        logger.warning("%s", studio.stop_training())
        if not run.wait(STOP_WAIT_SECONDS):
            logger.error("the training did not stop within %d s; its last saved file stays resumable.",
                         STOP_WAIT_SECONDS)
