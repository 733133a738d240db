"""Stage two, `train`: adversarial training with DRA targets read from the feature cache.

Recipe: validate flags -> open the cache (refuses incomplete stores) -> load the image shards it
names and refuse any mismatch (data, image size, augmentation spec, keys) -> target reader (RAM
or streamed) -> classifier + projection head + SGD + EMA -> resume -> per step: sampled
(sample, view) batch, recorded view replayed, PGD on top of it, AT loss + lambda * DRA loss ->
per epoch: log row + checkpoint (safetensors + JSON) -> metrics.json, with the peak RSS of every
process (streamed targets keep it flat however large the cache is).

``--dra-weight 0`` is plain AT (no head, no targets read). ``--online`` computes the same
targets with the diffusion model inside the step, for equivalence tests and cost comparison.
Under ``accelerate launch`` each process trains on its own slice of every global batch.
The set-up and the step live in ``pipeline/trainer.py``; this recipe adds epochs, checkpoints, resume.
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from pipeline import train_state
from pipeline.config import TrainConfig
from pipeline.runtime import peak_rss_mb
from pipeline.trainer import setup


def run(cfg: TrainConfig, *, stop_after_steps: int | None = None) -> dict:
    """Train; ``stop_after_steps`` (tests) checkpoints and returns after that many steps, like a kill."""
    tr = setup(cfg)
    rt, out = tr.rt, Path(cfg.out)
    st = train_state.fresh()
    if cfg.resume:
        st = train_state.load(out, cfg, tr.net, tr.opt, tr.ema, tr.gen, rt.device, tr.meta["cache"]["digest"]) or st
    tr.wrapped = rt.prepare(tr.net)

    def save() -> None:
        train_state.save(out, cfg, tr.net, tr.opt, tr.ema, tr.gen, st, tr.meta, rt, started)

    bar = tqdm(total=tr.total_steps, initial=st.global_step, desc=f"train {out.name}", unit="step", mininterval=2,
               disable=not rt.is_main)
    started = time.perf_counter() - st.seconds
    for epoch in range(st.epoch, cfg.epochs):
        if st.global_step >= tr.total_steps:
            break
        feed = tr.feed(epoch, st.step)
        tr.net.train()
        t_prev = time.perf_counter()
        try:
            for batch, inputs in feed:
                stats, lr, dra_w = tr.step(st.global_step, batch, inputs)
                now = time.perf_counter()
                st.add(stats, now - t_prev, lr, dra_w)
                t_prev = now
                st.step, st.global_step = batch.step + 1, st.global_step + 1
                bar.update(1)
                mid_epoch = st.step < tr.sampler.steps_per_epoch
                if cfg.checkpoint_every and st.global_step % cfg.checkpoint_every == 0 and mid_epoch:
                    save()
                if stop_after_steps is not None and st.global_step >= stop_after_steps:
                    save()
                    return {"stopped_at": st.global_step}
                if st.global_step >= tr.total_steps:  # --max-steps reached mid-epoch
                    break
        finally:
            feed.close()
        st.end_epoch(epoch, rt)
        rss = rt.gather(round(peak_rss_mb()))
        if rt.is_main:
            bar.set_postfix_str(f"{st.summary()} peak_rss_mb={'/'.join(map(str, rss))}")
        save()
    bar.close()
    budget = {**tr.sampler.budget(st.global_step), "steps_per_epoch": tr.sampler.steps_per_epoch}
    return train_state.finish(out, st, tr.meta, rt, started, budget, tr.net)

