"""Host-free torch core of ComfyUI-AFA: imports nothing from ComfyUI."""
