"""The data-scarce study (pipeline/params/scarce.yaml): upstream, DRA sweep and paired runs, in pieces
that each commit their results.

Everything runs in a git worktree (``.scarce/``) at the profile's ``code_commit`` (made there on a
new machine, checked out there when the profile moves it), so every run uses one code version; the profile is
read from the main checkout (it must be committed as it is), so a choice made after a piece (the
runs' list) does not need a new worktree.
Every training process runs at the profile's ``threads`` torch threads (runs are paired at one
thread count: float reductions differ between counts), ``jobs`` at a time.

    .venv/bin/python scripts/scarce.py upstream         # real shards, synthetic set, this machine's store
    .venv/bin/python scripts/scarce.py sweep            # DRA cells on validation (one seed each)
    .venv/bin/python scripts/scarce.py runs             # variants x seeds (seed-major: pairs first)
    .venv/bin/python scripts/scarce.py runs --minutes 90 --only at,dmat   # a piece of it
    .venv/bin/python scripts/scarce.py aa-standard      # standard AutoAttack, one seed per variant
    .venv/bin/python scripts/scarce.py report           # the tables and plots (also after every result)

Results (committed one by one, each with the code commit, the profile's blob, the processor and the
store's digest): ``results/scarce-upstream/`` (the synthetic set, its quality report and grid, the
target diagnostics, and one record per machine's store), ``results/scarce-sweep/CELL/`` (the run's
metrics, config and per-epoch log), ``results/scarce/KEY/seedK.json`` (the best-validation
checkpoint: PGD on ``evaluate.n`` test images, AutoAttack-fast on the first ``evaluate.autoattack_n``),
``results/scarce-last/KEY/seedK.json`` (the last checkpoint, PGD only),
``results/scarce-checkpoints/KEY/seedK/`` (the best checkpoint at ``aa_standard.seed``),
``results/scarce-aa-{standard,fast}/KEY/seedK.json`` (the two on the same images, for that checkpoint)
and ``results/scarce-logs/KEY/seedK.tsv`` (the per-epoch log: the overfitting curve). A stopped piece
resumes at the first job without a result; a job that was interrupted resumes from its finished
training and evaluations on this machine, or starts again from scratch. Every result regenerates the study's tables and plots in
docs/results.md (``report --curves`` and ``report --evals``: generated, never typed) and is committed
with them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROFILE = "pipeline/params/scarce.yaml"
WT = ROOT / ".scarce"
RESULTS = ["results/scarce", "results/scarce-last", "results/scarce-logs", "results/scarce-sweep", "results/scarce-checkpoints",
           "results/scarce-aa-standard", "results/scarce-aa-fast", "results/scarce-upstream"]
# the store's digest and size, and the digest of every array outside the target sets (the images and
# views), decoded: the same data compressed another way still matches
STORE_INFO = """import sys, json, hashlib, zarr
from pipeline.cache.store import open_cache
c, g, h = open_cache(sys.argv[1]), zarr.open_group(sys.argv[1], mode="r"), hashlib.sha256()
for part in sorted(c.parts):
    for name in sorted(n for n in g[part].array_keys() if not n.endswith("progress")):  # targets: groups
        a = g[part][name][...]
        h.update(f"{part}/{name} {a.dtype} {a.shape}".encode())
        h.update(json.dumps(a.tolist()).encode() if a.dtype == object else a.tobytes())
print(json.dumps({"digest": c.digest, "images_digest": h.hexdigest(),
                  "parts": {n: {"n": c.part(n).n, "k": c.part(n).k} for n in c.parts}}))
"""
LOCK = threading.RLock()  # one thread at a time regenerates the reports and commits


def sh(cmd: list[str], *, cwd: Path = ROOT, env: dict | None = None, capture: bool = False) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, check=True, text=True,
                         stdout=subprocess.PIPE if capture else None)
    return out.stdout.strip() if capture else ""


def aa_matched(results: Path) -> bool:
    """Whether the standard-AutoAttack table can be drawn: some standard result, and the same runs
    (KEY/seedK) evaluated by both AutoAttack versions (the report refuses a result without its
    counterpart; while one version of a run is still being evaluated, the table waits for it)."""
    runs = {v: {p.relative_to(results / f"scarce-aa-{v}") for p in (results / f"scarce-aa-{v}").glob("*/seed*.json")}
            for v in ("standard", "fast")}
    return bool(runs["standard"]) and runs["standard"] == runs["fast"]


def venv_env() -> dict[str, str]:
    """The environment with the project's virtual env first on PATH (``python`` is its interpreter)."""
    return dict(os.environ, PATH=f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}")


def flags(args: dict) -> list[str]:
    """{"real_limit": 1000, "augment": False} -> ["--real-limit", "1000", "--no-augment"]."""
    out: list[str] = []
    for k, v in args.items():
        name = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(name if v else "--no-" + k.replace("_", "-"))
        else:
            out += [name, str(v)]
    return out


class Study:
    def __init__(self, minutes: float) -> None:
        if sh(["git", "status", "--porcelain", "--", PROFILE], capture=True) or not sh(
                ["git", "ls-files", "--", PROFILE], capture=True):
            sys.exit(f"error: {PROFILE} is not committed as it is; the study runs the committed profile")
        self.profile = yaml.safe_load((ROOT / PROFILE).read_text())
        self.profile_blob = sh(["git", "rev-parse", f"HEAD:{PROFILE}"], capture=True)
        pin = sh(["git", "rev-parse", "--verify", f"{self.profile['code_commit']}^{{commit}}"], capture=True)
        if not WT.exists():  # a new machine: the worktree at the study's code commit
            sh(["git", "worktree", "prune"])
            sh(["git", "worktree", "add", "--detach", str(WT), pin])
            shutil.copytree(ROOT / "data" / "fashion-mnist", WT / "data" / "fashion-mnist")
        if sh(["git", "-C", str(WT), "rev-parse", "HEAD"], capture=True) != pin:  # the profile moved it
            if sh(["git", "-C", str(WT), "status", "--porcelain", "--untracked-files=no"], capture=True):
                sys.exit(f"error: {WT} has changes to tracked files; the study runs its code commit as it is")
            sh(["git", "-C", str(WT), "checkout", "-q", "--detach", pin])  # artifacts/ is ignored: kept
        self.pin = pin
        self.art = self.profile["artifacts"]
        self.deadline = time.time() + minutes * 60
        self.env = dict(venv_env(), OMP_NUM_THREADS=str(self.profile["threads"]), PYTHONUNBUFFERED="1")
        self.cpu = sh(["python", "-c", "from pipeline.core.runtime import cpu_model; print(cpu_model())"],
                      cwd=WT, env=self.env, capture=True)
        left = sh(["git", "ls-files", "--others", "--modified", "--exclude=*.tmp", "--", *RESULTS], capture=True)
        if left:  # results a failed commit or an interrupted piece left behind: a job is done once committed
            self.commit([ROOT / f for f in left.splitlines()], "scarce: results an earlier piece left uncommitted")

    # -- helpers -------------------------------------------------------------------------------
    def pipeline(self, *args: str, capture: bool = False, threads: int = 0) -> str:
        env = self.env if not threads else dict(self.env, OMP_NUM_THREADS=str(threads))
        return sh(["python", "-m", "pipeline", *args], cwd=WT, env=env, capture=capture)

    def stamp(self) -> dict:
        return {"code_commit": self.pin, "profile": PROFILE, "profile_blob": self.profile_blob,
                "driver": "scripts/scarce.py", "threads": self.profile["threads"], "cpu": self.cpu}

    def commit(self, files: list[Path], msg: str) -> None:
        with LOCK:
            rel = [str(f.relative_to(ROOT)) for f in files]
            for attempt in range(5):  # another git command's index.lock fails a commit: wait and retry
                try:
                    sh(["git", "add", "--", *rel])
                    if not sh(["git", "diff", "--cached", "--name-only", "--", *rel], capture=True):
                        return  # nothing changed (a redraw that another job's redraw already committed)
                    sh(["git", "commit", "-q", "-m", msg, "--", *rel])
                    print(f"committed: {msg}", flush=True)
                    return
                except subprocess.CalledProcessError:
                    time.sleep(10 * (attempt + 1))
            print(f"warning: could not commit {rel}; commit them by hand", flush=True)

    def write(self, path: Path, data: dict) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
        return path

    def time_left(self) -> bool:
        if time.time() < self.deadline:
            return True
        print("scarce: time is up; the next piece resumes here", flush=True)
        return False

    @property
    def store(self) -> str:
        return f"{self.art}/feats.zarr"

    def cache_digest(self) -> str:
        """The digest of this machine's store (verified when ``upstream`` built it)."""
        rec = WT / self.art / "store.json"
        if not rec.exists():
            sys.exit("error: this machine has no verified store yet (scripts/scarce.py upstream)")
        return json.loads(rec.read_text())["digest"]

    # -- upstream ------------------------------------------------------------------------------
    def upstream(self) -> None:
        """The real shards, the synthetic set and the feature store, in the worktree of this machine.

        The synthetic set is generated once and committed (``results/scarce-upstream/synthetic/``):
        every later machine copies it instead of sampling again, so every run of the study trains on
        the same images. The store is extracted on each machine that runs a piece (its targets differ
        between processors by float rounding, so its digest does too): each machine's store gets a
        record under ``results/scarce-upstream/stores/`` with its digest, the processor, and the digest
        of everything in it but the targets (the images and views, equal on every machine)."""
        p, art, up = self.profile, self.art, ROOT / "results" / "scarce-upstream"
        if not (WT / art / "shards/real/train/fingerprint.json").exists():
            self.pipeline("prepare", "--source", "data/fashion-mnist", "--out", f"{art}/shards/real")
        syn, committed = WT / art / "shards/synthetic", up / "synthetic"
        if not (syn / "generate.json").exists():  # written last: the set is complete
            if committed.exists():
                shutil.copytree(committed, syn / "train", dirs_exist_ok=True)
                shutil.copy(up / "generate.json", syn / "generate.json")
            else:
                self.pipeline("generate", "--model", p["model"], "--real-train", f"{art}/shards/real/train",
                              "--real-test", f"{art}/shards/real/test", "--out", str(syn.relative_to(WT)),
                              *flags(p["generate"]), threads=p["upstream_threads"])
        if not committed.exists():
            shutil.copytree(syn / "train", committed)
            for name in ("generate.json", "grid.png"):
                shutil.copy(syn / name, up / name)
            self.commit([committed, up / "generate.json", up / "grid.png"],
                        f"scarce: the synthetic set ({p['generate']['n']} images), committed for every machine")
        # extract resumes an unfinished store, and leaves a complete one of the same plan as it is
        self.pipeline("extract", "--model", p["model"], "--real-splits", f"{art}/shards/real",
                      "--synthetic", f"{art}/shards/synthetic/train", "--out", self.store, *flags(p["extract"]),
                      threads=p["upstream_threads"])
        verify = self.pipeline("cache", "verify", self.store, capture=True)
        info = json.loads(sh(["python", "-c", STORE_INFO, self.store], cwd=WT, env=self.env, capture=True))
        model = json.loads((ROOT / p["model"] / "model_info.json").read_text())
        # checked before anything is written: a record left behind would be committed by the next start
        others = {json.loads(f.read_text())["images_digest"] for f in (up / "stores").glob("*.json")}
        if others - {info["images_digest"]}:
            sys.exit(f"error: this store's images and views ({info['images_digest'][:12]}...) differ from another "
                     f"machine's ({', '.join(sorted(d[:12] for d in others))}...): the study's runs would not train "
                     "on one data set; find out why before running")
        rec = {**info, "verify": verify.splitlines()[-1:], **self.stamp(), "model": p["model"], "model_info": model}
        files = [self.write(up / "stores" / f"{info['digest'][:12]}.json", rec)]
        if not (up / "probe.json").exists():  # the target diagnostics (the first store's)
            self.pipeline("cache", "probe", self.store, "--out", str(up / "probe.json"))
            files.append(up / "probe.json")
        self.write(WT / art / "store.json", rec)  # the store this machine verified: its runs name it
        self.commit(files, f"scarce: a store on {self.cpu} (digest {info['digest'][:12]}..., "
                           f"images and views {info['images_digest'][:12]}...)")

    # -- training jobs ---------------------------------------------------------------------------
    def train(self, out: str, args: dict, seed: int) -> dict:
        full = {**self.profile["train"], **args, "seed": seed}
        self.pipeline("train", "--cache", self.store, "--cache-digest", self.cache_digest(), "--out", out,
                      "--overwrite", *flags(full))
        return json.loads((WT / out / "metrics.json").read_text())

    def evaluate(self, ckpt: str, name: str, out: str, **over: object) -> dict:
        ev = {**self.profile["evaluate"], **over}
        self.pipeline("evaluate", "--checkpoint", ckpt, "--shards", f"{self.art}/shards/real/test",
                      "--name", name, "--out", out, *flags(ev))
        return json.loads((WT / out).read_text())

    def trained(self, out: str, args: dict, seed: int) -> bool:
        """Whether ``out`` holds a finished run of exactly these settings on this machine's store (a job
        stopped after its training resumes there instead of training again)."""
        try:
            cfg = json.loads((WT / out / "config.json").read_text())
            metrics = json.loads((WT / out / "metrics.json").read_text())
        except (OSError, ValueError):
            return False
        ran = cfg.get("train", {})
        want = {**self.profile["train"], **args, "seed": seed, "cache_digest": self.cache_digest()}
        return cfg.get("finished") is True and "best" in metrics and all(ran.get(k) == v for k, v in want.items())

    def evaluated(self, ckpt: str, name: str, out: str, *, after: str, **over: object) -> dict:
        """``evaluate``, or its result when one newer than the run ``after`` finished is there already
        (with this profile's settings: the evaluation's own record of them is compared)."""
        path, done = WT / out, WT / after / "metrics.json"
        if path.exists() and path.stat().st_mtime > done.stat().st_mtime:
            res = json.loads(path.read_text())
            ev = {**self.profile["evaluate"], **over}
            if all(res.get(k) == ev[k] for k in ("n", "seed", "eps")) and res.get("autoattack_version") == ev["autoattack"]:
                return res
        return self.evaluate(ckpt, name, out, **over)

    def sweep_cells(self) -> dict[str, dict]:
        s = self.profile["sweep"]
        return {f"t{t}-{layer}-{align or 'pooled'}-w{w:g}": {"t": t, "layer": layer, "align_layer": align, "dra_weight": w}
                for t, layer in s["target_sets"] for align in s["align_layers"] for w in s["dra_weights"]}

    def sweep_job(self, cell: str, args: dict) -> None:
        dst = ROOT / "results" / "scarce-sweep" / cell
        if (dst / "metrics.json").exists() or not self.time_left():
            return
        s = self.profile["sweep"]
        print(f"scarce sweep: {cell} ({time.strftime('%H:%M:%S')})", flush=True)
        out = f"{self.art}/sweep/{cell}"
        m = self.train(out, {**s["train"], **args}, s["seed"])
        dst.mkdir(parents=True, exist_ok=True)
        for name in ("log.tsv", "config.json"):
            shutil.copy(WT / out / name, dst / name)
        files = [dst / "log.tsv", dst / "config.json",
                 self.write(dst / "metrics.json", {**m, "cell": args, "study": self.stamp(),
                                                   "cache_digest": self.cache_digest()})]
        self.commit(files, f"scarce sweep: {cell}: best validation PGD {m['best']['val_pgd']:.3f} "
                           f"(epoch {m['best']['epoch']})")
        self.redraw()

    def chosen(self) -> dict:
        """The sweep cell with the highest best-epoch validation PGD (ties: the first in profile order)."""
        cells = self.sweep_cells()
        missing = [c for c in cells if not (ROOT / "results" / "scarce-sweep" / c / "metrics.json").exists()]
        if missing:
            raise SystemExit(f"error: the DRA runs need the whole sweep; missing: {', '.join(missing)}")
        scores = {c: json.loads((ROOT / "results" / "scarce-sweep" / c / "metrics.json").read_text())["best"]["val_pgd"]
                  for c in cells}
        return cells[max(cells, key=lambda c: (scores[c], -list(cells).index(c)))]

    def run_job(self, key: str, seed: int) -> None:
        dst = ROOT / "results" / "scarce" / key / f"seed{seed}.json"
        if dst.exists() or not self.time_left():
            return
        spec = dict(self.profile["runs"][key])
        variant = spec.pop("variant")
        if spec.pop("dra", None) == "sweep":
            spec.update(self.chosen())
        print(f"scarce: {key} seed {seed} ({time.strftime('%H:%M:%S')})", flush=True)
        out = f"{self.art}/train/{key}-s{seed}"
        if not self.trained(out, spec, seed):
            self.train(out, spec, seed)
        best = self.evaluated(f"{out}/best", variant, f"{self.art}/eval/{key}-s{seed}.json", after=out)
        last = self.evaluated(out, variant, f"{self.art}/eval-last/{key}-s{seed}.json", after=out, autoattack="none")
        # the AutoAttack comparison's checkpoint is committed (320 KB): any later machine evaluates it
        aa = self.keep_checkpoint(key, seed, out) if seed == self.profile["aa_standard"]["seed"] else []
        extra = {"study": self.stamp(), "cache_digest": self.cache_digest(), "run_args": spec}
        files = [self.write(dst, {**best, **extra}),
                 self.write(ROOT / "results" / "scarce-last" / key / f"seed{seed}.json", {**last, **extra})]
        logs = ROOT / "results" / "scarce-logs" / key / f"seed{seed}.tsv"
        logs.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(WT / out / "log.tsv", logs)
        shutil.copy(WT / out / "config.json", logs.parent / "config.json")  # the setting (same for every seed)
        self.commit(files + aa + [logs, logs.parent / "config.json"], f"scarce: {key} seed {seed} ({variant}): "
                    f"best-validation checkpoint clean {best['clean']:.4f}, PGD {best['pgd']:.4f}, "
                    f"AutoAttack {best['autoattack']}")
        self.redraw()

    @staticmethod
    def kept(key: str, seed: int) -> Path:
        """Where run ``key``'s best checkpoint at ``seed`` is committed (``keep_checkpoint``)."""
        return ROOT / "results" / "scarce-checkpoints" / key / f"seed{seed}"

    def keep_checkpoint(self, key: str, seed: int, out: str) -> list[Path]:
        """Run ``out``'s best-validation checkpoint and its metrics (which name that epoch), under
        ``results/scarce-checkpoints/KEY/seedK/``; returns the files."""
        dst = self.kept(key, seed)
        shutil.copytree(WT / out / "best", dst / "best", dirs_exist_ok=True)
        shutil.copy(WT / out / "metrics.json", dst / "metrics.json")
        return [dst / "metrics.json", *sorted((dst / "best").iterdir())]

    def aa_standard(self) -> None:
        """Standard AutoAttack and the profile's fast subset on the same ``aa_standard.n`` test images, for
        the committed best checkpoint of each run at ``aa_standard.seed``: how far AutoAttack-fast is from
        the reference here. ``jobs`` evaluations at a time, each result committed on its own."""
        self.pool([(key, version) for key in self.profile["runs"] for version in ("standard", "fast")], self.aa_job)

    def aa_job(self, key: str, version: str) -> None:
        seed = self.profile["aa_standard"]["seed"]
        ckpt = self.kept(key, seed) / "best"
        dst = ROOT / "results" / f"scarce-aa-{version}" / key / f"seed{seed}.json"
        if dst.exists() or not ckpt.exists() or not self.time_left():
            return
        print(f"scarce: AutoAttack {version}, {key} seed {seed} ({time.strftime('%H:%M:%S')})", flush=True)
        res = self.evaluate(str(ckpt), self.profile["runs"][key]["variant"], f"{self.art}/aa-{version}/{key}.json",
                            n=self.profile["aa_standard"]["n"], autoattack=version, autoattack_n=0)
        self.commit([self.write(dst, {**res, "study": self.stamp(), "cache_digest": self.cache_digest()})],
                    f"scarce: AutoAttack {version} on {res['n']} images, {key} seed {seed}: {res['autoattack']}")
        self.redraw()

    def redraw(self) -> None:
        """The tables and plots again, committed on their own; a failure is a warning (the results are
        committed already, and `scarce.py report` redraws them later)."""
        with LOCK:
            if sh(["git", "status", "--porcelain", "--", "docs/results.md"], capture=True):
                print("warning: docs/results.md has uncommitted changes; its tables are not redrawn now "
                      "(commit them, then `scarce.py report`)", flush=True)
                return
            try:
                self.commit(self.reports(), "scarce: tables and plots regenerated from the committed results")
            except subprocess.CalledProcessError as exc:
                # docs/results.md was clean before: a half-redrawn one would stop every later redraw
                sh(["git", "checkout", "--", "docs/results.md"])
                print(f"warning: the tables were not redrawn ({exc}); `scarce.py report` does it", flush=True)

    def reports(self) -> list[Path]:
        """Regenerate the study's tables and plots in docs/results.md from the committed results (what
        exists so far): the pilots' and the runs' validation curves, the sweep, the best-validation and
        last checkpoints' tables with the paired contrasts. Returns the files written."""
        r, written = ROOT / "results", []
        env = venv_env()

        def report(args: list[str], out: str, block: str) -> None:
            sh(["python", "-m", "pipeline", "report", *args, "--out", out, "--readme", f"docs/results.md#{block}"],
               env=env, capture=True)
            written.extend([ROOT / out, ROOT / "docs" / "results.md"])

        report(["--curves", "results/pilots"], "results/pilots-report", "scarce-pilots")
        probe = ["--probe", "results/scarce-upstream/probe.json"] if (r / "scarce-upstream" / "probe.json").exists() else []
        for folder, block in (("scarce-logs", "scarce-curves"), ("scarce-sweep", "scarce-sweep")):
            if any((r / folder).glob("*/*.tsv")):
                report(["--curves", f"results/{folder}", *probe], f"results/{folder}-report", block)
        if aa_matched(r):
            report(["--evals", "results/scarce-aa-fast", "--aa-standard", "results/scarce-aa-standard"],
                   "results/scarce-aa-report", "scarce-aa")
        for folder, block in (("scarce", "scarce"), ("scarce-last", "scarce-last")):
            have = {json.loads(p.read_text())["variant"] for p in (r / folder).glob("*/seed*.json")}
            if not have:
                continue
            pairs = [p for p in self.profile["contrasts"].split(",")
                     if set(x for half in p.split("/") for x in half.split(":")) <= have]
            report(["--evals", f"results/{folder}", "--train", "", "--grid", "", "--baseline", ",".join(pairs)],
                   f"results/{folder}-report", block)
        return written

    def pool(self, jobs: list[tuple], fn) -> None:  # noqa: ANN001
        """``jobs`` at most ``profile.jobs`` at a time; the first failure (or Ctrl-C) cancels every job not
        yet started, lets the running ones finish, and is raised."""
        ex = ThreadPoolExecutor(max_workers=int(self.profile["jobs"]))
        try:
            for f in as_completed([ex.submit(fn, *j) for j in jobs]):
                f.result()
        except BaseException:
            ex.shutdown(wait=True, cancel_futures=True)
            raise
        ex.shutdown(wait=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["upstream", "sweep", "runs", "aa-standard", "report"])
    ap.add_argument("--minutes", type=float, default=1e6, help="start no new job after this many minutes")
    ap.add_argument("--only", default="", help="runs: these run keys only (comma list)")
    a = ap.parse_args()
    s = Study(a.minutes)
    if a.step == "upstream":
        s.upstream()
    elif a.step == "sweep":
        s.pool(list(s.sweep_cells().items()), s.sweep_job)
    elif a.step == "runs":
        keys = [k for k in s.profile["runs"] if not a.only or k in a.only.split(",")]
        s.pool([(k, seed) for seed in s.profile["seeds"] for k in keys], s.run_job)
    elif a.step == "aa-standard":
        s.aa_standard()
    else:  # the tables and plots again, from the committed results
        s.redraw()


if __name__ == "__main__":
    main()
