"""The Shapes proving ground: a small world where every part of rlkit runs on a CPU and gains are measurable.

- :mod:`rlkit.shapes.world`: seeded drawn pictures and captions, the fixed held-out prompts, a
  ``datasets`` stream.
- :mod:`rlkit.shapes.pretrain`: the tiny VAE and SD3-architecture generator, rectified-flow pretraining,
  ``load_generator`` and a CFG sampler.
- :mod:`rlkit.shapes.judges`: annotators (noisy labels), the analytic golden judge (``shapes-golden``),
  realism guards, the CLIP-style reward (``shapes-clip``).
- :mod:`rlkit.shapes.preferences`: the annotated preference pairs with precomputed latents.
- :mod:`rlkit.shapes.build`: ``build_all`` rebuilds every shipped checkpoint under ``assets/``.

Nothing heavy is imported here; import the submodules.
"""
