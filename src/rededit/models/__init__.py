"""Models: the editor backbone around diffusers' ``QwenImageTransformer2DModel`` (:mod:`.backbone`: references
as extra tokens, x0/velocity prediction, frozen text tail), its FireEdit options (:mod:`.fireedit`), token packing,
the VAEs (pixel autoencoder, Qwen-Image VAE), text encoders (MiniLM, Qwen2.5-VL), face detection/identity
models and the EMA math (:mod:`.ema`).

May import: ``rededit.utils`` only. No Lightning.
"""
