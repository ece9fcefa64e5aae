"""SD1.5-architecture UNet configs shared by the benchmarks (ComfyUI's detected-config keys)."""
SD15_FULL = dict(num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1] * 9 + [0] * 3,
                 transformer_depth_middle=1)
SD15_TINY = dict(num_res_blocks=[1], channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
                 transformer_depth_middle=1)
BASE = dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
            in_channels=4, out_channels=4, model_channels=320, use_linear_in_transformer=False, context_dim=768,
            use_temporal_resblock=False, use_temporal_attention=False)
