"""The Merge tab: the five-step wizard (adapter, precision with the plan first, output and the
merge with its progress, the verification table, the upload) by keyboard at 80x24.

The first tests drive the pane through a fake backend (``FakeMerge``: the requests it got and
the events a real backend sends, in the protocol's shapes, checked against its dataclasses); the
last one walks the wizard against a real backend, from a tiny adapter trained through train.start
to a verified merged folder. Waits poll a condition with a timeout, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

from textual.widgets import Checkbox, Input, Select

from backend import protocol as P
from tests.functional.helpers import make_app, skip_unless_backend_has, tab_after_tiny_training, until, without_backend
from tui.app import QlwApp
from tui.client import CONNECTED, RequestFailed
from tui.messages import BackendEvent, ConnectionChanged
from tui.modals.confirm_screen import ConfirmScreen
from tui.widgets.chat.backend_call import params_of
from tui.widgets.merge.merge_format import hub_line, verify_summary
from tui.widgets.merge.merge_pane import ADAPTER, OUTPUT, PRECISION, UPLOAD, VERIFY, MergePane

SIZE = (80, 24)
T0 = 1_700_000_000.0
HOME = "/data/qlw"
ADAPTERS = [
    {"path": f"{HOME}/runs/ab12cd34ef/adapter", "session": "ab12cd34ef", "kind": "adapter", "step": 30,
     "base_model": f"{HOME}/models/tiny-llama", "r": 8, "lora_alpha": 16, "target_modules": ["v_proj", "q_proj"],
     "size_bytes": 140_000, "mtime": T0, "run_config": f"{HOME}/runs/ab12cd34ef/config.toml", "final_loss": 1.8125},
    {"path": f"{HOME}/runs/ab12cd34ef/checkpoints/checkpoint-20", "session": "ab12cd34ef", "kind": "checkpoint",
     "step": 20, "base_model": f"{HOME}/models/tiny-llama", "r": 8, "lora_alpha": 16,
     "target_modules": ["q_proj", "v_proj"], "size_bytes": 140_000, "mtime": T0 - 60, "run_config": None,
     "final_loss": None},
]
FILES = [{"name": "model.safetensors", "size_bytes": 2_800_000}, {"name": "config.json", "size_bytes": 700},
         {"name": "README.md", "size_bytes": 1_500}]
VERIFIED = {"out": f"{HOME}/merged/ab12cd34-adapter-merged", "dtype": "bf16", "merge_dtype": "bf16", "prompts": 4,
            "noise_floor": 0.0125,
            "rows": [{"model": "merged", "max_abs_logit_diff": 0.0078, "perplexity": 41.234, "size_bytes": 2_801_000,
                      "load_s": 0.21},
                     {"model": "trained (4-bit base + adapter)", "max_abs_logit_diff": None, "perplexity": 41.2,
                      "size_bytes": None, "load_s": 0.4},
                     {"model": "full-precision base + adapter", "max_abs_logit_diff": 0.031, "perplexity": 40.9,
                      "size_bytes": None, "load_s": 0.3}]}


def plan_for(p: dict[str, Any], exists: bool) -> dict[str, Any]:
    out = p["out"] if p["out"].startswith("/") else f"{HOME}/merged/{p['out']}"
    return {"adapter": ADAPTERS[0], "base": {"source": "", "precision": "4bit", "precision_label": "4-bit nf4",
                                             "path": f"{HOME}/models/tiny-llama", "parameters": 700_000},
            "into_default": "dequantized", "dtype": p["dtype"], "into": p["into"], "max_shard_size": p["max_shard_size"],
            "device": "cpu", "memory": {"need_bytes": 3 * 1024**2, "free_bytes": 8 * 1024**3, "verdict": "fits"},
            "disk": {"size_bytes": int(1.5 * 1024**2), "need_bytes": int(65.5 * 1024**2), "free_bytes": 50 * 1024**3}, "out": out, "out_exists": exists,
            "warnings": [f"{out} exists: merging replaces it (confirm to overwrite)"] if exists else []}


class FakeMerge:
    """The merge and upload backend as the protocol describes it."""

    def __init__(self, app: QlwApp, out_exists: bool = False, offline: bool = True):
        self.app, self.out_exists, self.offline = app, out_exists, offline
        self.sent: list[Any] = []
        self.seq = itertools.count(1)
        self.ids = itertools.count(1)

    def of(self, method: str) -> list[dict[str, Any]]:
        return [params_of(p) for p in self.sent if p.METHOD == method]

    def post(self, kind: str, payload: dict[str, Any]) -> None:
        if kind in P.EVENTS:
            P.build(P.EVENTS[kind], payload, kind)
        seq = next(self.seq)
        self.app.post_message(BackendEvent(P.Event(kind, payload, T0 + seq, session="s1", seq=seq)))

    async def call(self, params, timeout=30.0):
        self.sent.append(params)
        method, p = params.METHOD, params_of(params)
        if method == "merge.adapters":
            return {"adapters": ADAPTERS}
        if method == "merge.plan":
            return plan_for(p, self.out_exists)
        if method == "merge.start":
            if self.out_exists and not p["overwrite"]:
                out = plan_for(p, True)["out"]
                raise RequestFailed(P.Reply("r", "refused", {"out": out}, code="confirm",
                                            reason=f"{out} exists: confirm to overwrite it"))
            job = f"merge{next(self.ids)}"
            asyncio.get_running_loop().call_soon(self._merge, job, p)
            return {"job_id": job, "session": "s1"}
        if method == "hub.status":
            return {"offline": self.offline, "endpoint": "https://huggingface.co", "token_source": None, "user": None}
        if method == "hub.push":
            if not p["dry_run"] and self.offline:
                raise RequestFailed(P.Reply("r", "refused", reason="offline (HF_HUB_OFFLINE=1): local export only"))
            job = f"push{next(self.ids)}"
            files = [{"path": f["name"], "size_bytes": f["size_bytes"]} for f in FILES]
            result = {"repo_id": p["repo_id"], "url": f"https://huggingface.co/{p['repo_id']}", "private": p["private"],
                      "files": files, "dry_run": p["dry_run"]}
            self.post("job.started", {"job_id": job, "kind": "hub.push", "params": p})
            self.post("hub.pushed", result)
            self.post("job.finished", {"job_id": job, "kind": "hub.push", "status": "done", "elapsed_s": 0.1,
                                       "result": result})
            return {"job_id": job, "session": "s1"}
        raise AssertionError(f"unexpected request {method}")

    def _merge(self, job: str, p: dict[str, Any]) -> None:
        out = plan_for(p, False)["out"]
        self.post("job.started", {"job_id": job, "kind": "merge.start", "params": p})
        for stage, done, total, unit in (("loading base", 0, 0, ""), ("merging", 2, 4, "layers"),
                                         ("saving", 2_000_000, 2_802_200, "bytes")):
            self.post("job.progress", {"job_id": job, "stage": stage, "done": done, "total": total, "unit": unit})
        saved = {"out": out, "files": FILES, "size_bytes": 2_802_200, "merge_s": 0.5, "save_s": 0.25,
                 "dtype": p["dtype"], "into": p["into"]}
        self.post("merge.saved", saved)
        verified = {**VERIFIED, "out": out} if p["verify"] else None
        if verified:
            self.post("merge.verified", verified)
        self.post("job.finished", {"job_id": job, "kind": "merge.start", "status": "done", "elapsed_s": 2.5,
                                   "result": {"out": out, "files": FILES, "size_bytes": 2_802_200, "merge_s": 0.5,
                                              "save_s": 0.25, "verify": verified}})


async def open_merge(pilot, fake: FakeMerge | None = None) -> MergePane:
    app = pilot.app
    await without_backend(pilot)
    app.screen.action_show_tab("merge")
    pane = app.screen.query_one(MergePane)
    if fake is not None:
        pane.call = fake.call
        pane.on_connection(ConnectionChanged(CONNECTED))
        await until(pilot, lambda: pane.adapter_step.adapters, "the adapters")
    pane.adapter_step.table.focus()
    await pilot.pause()
    return pane


def text_of(pane: MergePane, selector: str) -> str:
    return str(pane.query_one(selector).render())


def rows(table) -> list[list[str]]:
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


# Tests --------------------------------------------------------------------------------------


def test_the_wizard_by_keyboard_from_adapter_to_upload_dry_run(qlw_home):
    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=SIZE) as pilot:
            fake = FakeMerge(app, out_exists=True)
            pane = await open_merge(pilot, fake)
            assert all(b.id and b.tooltip for b in MergePane.BINDINGS)
            # Step 1: the adapters, the highlighted one's LoRA config.
            assert rows(pane.adapter_step.table)[0] == ["ab12cd34 adapter", "30", "tiny-llama", "8/16", "1.8125",
                                                        "136.72 KiB"]
            assert rows(pane.adapter_step.table)[1][:2] == ["ab12cd34 checkpoint-20", "20"]
            info = text_of(pane, "#merge-adapter-info")
            assert info.startswith("LoRA r=8 lora_alpha=16 on q_proj, v_proj\nbase /data/qlw/models/tiny-llama · "
                                   "step 30 · final loss 1.8125")
            await pilot.press("ctrl+b")  # nothing before step 1
            assert pane.step == ADAPTER
            await pilot.press("enter")
            # Step 2: the plan first, then dtype and into.
            await until(pilot, lambda: pane.step == PRECISION and pane.plan is not None, "the plan")
            plan = text_of(pane, "#merge-plan")
            assert plan.splitlines()[:3] == [
                "base tiny-llama, trained 4-bit nf4 · default into: dequantized",
                "✔ memory on cpu: 3.00 MiB needed, 8.00 GiB free → fits",
                "✔ disk: about 1.50 MiB written, 50.00 GiB free"]  # the folder's size, not the margin
            assert "⚠ /data/qlw/merged/ab12cd34-adapter-merged exists" in plan
            assert fake.of("merge.plan")[0] == {"adapter": ADAPTERS[0]["path"], "out": "ab12cd34-adapter-merged",
                                                "dtype": "bf16", "into": "dequantized", "max_shard_size": "5GB"}
            assert app.focused is pane.precision_step.query_one("#merge-dtype")
            pane.precision_step.query_one("#merge-dtype", Select).value = "fp32"
            await until(pilot, lambda: fake.of("merge.plan")[-1]["dtype"] == "fp32", "the plan again")
            await pilot.press("ctrl+n")
            # Step 3: output folder and shard size; the folder exists: a confirm, then the merge.
            await until(pilot, lambda: pane.step == OUTPUT, "step 3")
            assert app.focused is pane.output_step.query_one("#merge-out")
            assert pane.output_step.out == "ab12cd34-adapter-merged"
            await until(pilot, lambda: "exists: merging asks" in text_of(pane, "#merge-out-line"), "the out line")
            pane.output_step.query_one("#merge-shard", Input).value = "500MB"
            await pilot.press("ctrl+n")  # not before the merge
            assert pane.step == OUTPUT and pane.status_text.startswith("✖ merge first")
            await pilot.press("f5")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirm")
            await pilot.press("y")
            await until(pilot, lambda: pane.step == VERIFY, "step 4 after the merge")
            starts = fake.of("merge.start")
            assert [s["overwrite"] for s in starts] == [False, True]
            assert starts[1] | {"overwrite": None} == {
                "adapter": ADAPTERS[0]["path"], "out": "ab12cd34-adapter-merged", "dtype": "fp32",
                "into": "dequantized", "max_shard_size": "500MB", "verify": True, "overwrite": None, "prompts": []}
            assert "✔ saved 3 files, 2.67 MiB in /data/qlw/merged/ab12cd34-adapter-merged" in text_of(pane, "#merge-saved")
            assert text_of(pane, "#merge-stage") == "✔ merged in 2.5 s: /data/qlw/merged/ab12cd34-adapter-merged"
            bar = pane.output_step.query_one("#merge-progress")
            assert bar.display and bar.total == 2_802_200 and bar.progress == bar.total
            # Step 4: the verification table with the noise floor beside it.
            assert rows(pane.verify_step.table) == [
                ["merged", "7.80e-03", "41.234", "2.67 MiB", "0.21"],
                ["trained (4-bit base + adapter)", "—", "41.200", "—", "0.40"],
                ["full-precision base + adapter", "3.10e-02", "40.900", "—", "0.30"]]
            assert text_of(pane, "#merge-verify-line").splitlines()[1:] == [
                "max |Δ logit| vs the model as trained · noise floor 1.25e-02 (the base in bf16 vs fp32) · 4 prompts",
                "✔ the merged model is within the noise floor"]
            await pilot.press("ctrl+n")
            # Step 5: offline, so a local export only; the dry run lists the files.
            await until(pilot, lambda: pane.step == UPLOAD and pane.hub is not None, "step 5")
            assert text_of(pane, "#hub-status").startswith("Hub: offline (HF_HUB_OFFLINE=1): local export only")
            assert pane.upload_step.private  # on by default
            # The dry run checks the repository name as the upload will: no placeholder stands in
            # (issue 15: the dry run accepted "user/model-name", which the upload refuses).
            await pilot.press("f5")
            await until(pilot, lambda: "name the repository" in text_of(pane, "#hub-result"), "the refusal")
            assert fake.of("hub.push") == []
            pane.upload_step.query_one("#hub-repo", Input).value = "me/tiny-merged"
            await pilot.press("f5")
            await until(pilot, lambda: pane.upload_step.files.row_count == 3, "the dry run's files")
            assert fake.of("hub.push") == [{"folder": "/data/qlw/merged/ab12cd34-adapter-merged",
                                            "repo_id": "me/tiny-merged", "private": True, "adapter_only": False,
                                            "dry_run": True, "commit_message": ""}]
            await until(pilot, lambda: text_of(pane, "#hub-result").startswith("dry run: 3 files"), "the line")
            assert text_of(pane, "#hub-result") == ("dry run: 3 files, 2.67 MiB would go to me/tiny-merged (private); "
                                                    "nothing was sent")
            # The real upload is refused offline, plainly.
            await pilot.press("f6")
            await until(pilot, lambda: "not uploaded" in text_of(pane, "#hub-result"), "the refusal")
            assert text_of(pane, "#hub-result") == "✖ not uploaded: offline (HF_HUB_OFFLINE=1): local export only"
            # Adapter only: the adapter's folder.
            pane.upload_step.query_one("#hub-adapter-only", Checkbox).value = True
            await pilot.press("f5")
            await until(pilot, lambda: len(fake.of("hub.push")) == 3, "the adapter's dry run")
            assert fake.of("hub.push")[-1]["folder"] == ADAPTERS[0]["path"] and fake.of("hub.push")[-1]["adapter_only"]
            # Back through the steps by keyboard.
            for step in (VERIFY, OUTPUT, PRECISION, ADAPTER):
                await pilot.press("ctrl+b")
                assert pane.step == step
        await app.backend.stop()

    asyncio.run(body())


def test_keys_follow_the_step_and_fit_80x24(qlw_home):
    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=SIZE) as pilot:
            fake = FakeMerge(app)
            pane = await open_merge(pilot, fake)

            def keys() -> set[str]:
                return {b.binding.action for b in app.screen.active_bindings.values()
                        if b.enabled and b.node is pane}

            assert keys() == {"next", "refresh"}
            await pilot.press("ctrl+n")
            await until(pilot, lambda: pane.step == PRECISION and pane.plan is not None, "step 2")
            assert keys() == {"next", "back", "plan"}
            titles = {c.title for c in app.get_system_commands(app.screen)}
            assert {"Next", "Back", "Plan"} <= titles
            await pilot.press("ctrl+n")
            assert keys() == {"next", "back", "merge"}
            for widget in pane.output_step.query("Input, Button, Checkbox"):
                assert widget.region.bottom <= 24 and widget.region.height >= 1, widget
        await app.backend.stop()

    asyncio.run(body())


def test_formatting():
    assert hub_line({"offline": False, "endpoint": "https://hf.co", "token_source": "HF_TOKEN", "user": "me"}) == \
        "Hub https://hf.co: token from HF_TOKEN as me"
    assert "no token" in hub_line({"offline": False, "endpoint": "https://hf.co", "token_source": None})
    far = {**VERIFIED, "rows": [{"model": "merged", "max_abs_logit_diff": 0.5}]}
    assert verify_summary(far).endswith("⚠ the merged model differs by 40.0× the noise floor")


def test_merge_pane_snapshot(snap_compare, qlw_home):
    """Step 4 after a merge (fake backend: fixed figures, no clock) at 80x24."""

    async def settle(pilot):
        app = pilot.app
        app.animation_level = "none"
        fake = FakeMerge(app)
        pane = await open_merge(pilot, fake)
        await pilot.press("enter")
        await until(pilot, lambda: pane.plan is not None, "the plan")
        await pilot.press("ctrl+n")
        await until(pilot, lambda: pane.step == OUTPUT, "step 3")
        await pilot.press("f5")
        await until(pilot, lambda: pane.step == VERIFY and not pane.merge_job, "step 4")
        await pilot.pause(0.2)
        app.clear_notifications()
        await pilot.pause()

    assert snap_compare(make_app(qlw_home), terminal_size=SIZE, run_before=settle)


# With a real backend ------------------------------------------------------------------------


def test_real_backend_the_wizard_walks_from_adapter_to_verified_folder(backend_with_tiny):
    """A 3-step adapter of the tiny model (fp32 on the CPU), merged in fp32 by keyboard; the
    folder exists on disk and its verification table says the merged model is the trained one."""
    skip_unless_backend_has(backend_with_tiny, "merge.adapters")

    async def body():
        async with tab_after_tiny_training(backend_with_tiny, "merge", SIZE) as (pilot, adapter):
            app = pilot.app
            pane = app.screen.query_one(MergePane)
            await until(pilot, lambda: pane.adapter_step.adapters, "the adapters", timeout=20)
            paths = [a["path"] for a in pane.adapter_step.adapters]
            assert adapter in paths, (adapter, paths)
            pane.adapter_step.table.focus()
            pane.adapter_step.table.move_cursor(row=paths.index(adapter))
            await pilot.press("enter")
            await until(pilot, lambda: pane.step == PRECISION and pane.plan is not None, "the plan", timeout=30)
            assert pane.plan["memory"]["verdict"] in ("fits", "tight")
            pane.precision_step.query_one("#merge-dtype", Select).value = "fp32"
            await pilot.pause()
            await pilot.press("ctrl+n")
            await until(pilot, lambda: pane.step == OUTPUT, "step 3")
            await pilot.press("f5")
            try:
                await until(pilot, lambda: pane.step == VERIFY and pane.verified is not None, "the verification",
                            timeout=150)
            except AssertionError:
                log = (backend_with_tiny / "backend-test.log").read_text()[-2000:]
                raise AssertionError(f"status: {pane.status_text}; stage: {text_of(pane, '#merge-stage')}; "
                                     f"backend log:\n{log}") from None
            out = Path(pane.merged_out)
            assert (out / "config.json").is_file() and any(out.glob("*.safetensors"))
            table = rows(pane.verify_step.table)
            merged = next(r for r in table if r[0] == "merged")
            assert float(merged[1]) < 1e-3  # fp32: the merged model is the trained one
            assert "noise floor" in text_of(pane, "#merge-verify-line")
            await pilot.press("ctrl+n")
            await until(pilot, lambda: pane.step == UPLOAD and pane.hub is not None, "step 5", timeout=20)
            assert "local export only" in text_of(pane, "#hub-status")  # the tests run offline
        await app.backend.stop()

    asyncio.run(asyncio.wait_for(body(), 240))
