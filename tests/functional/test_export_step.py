"""The Merge wizard's Export step (step 6) by keyboard at 80x24, through a fake backend that
answers export.plan and export.start as the protocol describes (payloads checked against its
dataclasses): the plan line, a k-quant refused with the command that adds llama-cpp-python, the
export's progress, the saved file and the read-back table with its checks, and the confirm
before replacing a file."""

from __future__ import annotations

import asyncio
from typing import Any

from textual.widgets import Input, Select

from tests.functional.helpers import make_app, until
from tests.functional.test_merge_pane import HOME, SIZE, FakeMerge, open_merge, rows, text_of
from tui.client import RequestFailed
from tui.modals.confirm_screen import ConfirmScreen
from tui.widgets.merge.merge_pane import EXPORT, UPLOAD, VERIFY, MergePane

from backend import protocol as P

MERGED = f"{HOME}/merged/ab12cd34-adapter-merged"
COMMAND = 'pip install "qlw[gguf]"'


class FakeExport(FakeMerge):
    """FakeMerge, and the export.* requests."""

    def __init__(self, app, **kwargs):
        super().__init__(app, **kwargs)
        self.exported: set[str] = set()

    def export_plan(self, p: dict[str, Any]) -> dict[str, Any]:
        name = p["out"] or f"ab12cd34-adapter-merged-{p['quant']}.gguf"
        out = name if name.startswith("/") else f"{HOME}/exports/{name}"
        refusal = (f"{p['quant']} is a k-quant: only llama.cpp's quantizer makes it, and llama-cpp-python is not "
                   f"installed: add it with {COMMAND}") if p["quant"] in ("q4_k_m", "q5_k_m") else ""
        return {"model": {"kind": "merged", "path": p["model"], "merged_folder": p["model"], "architecture": "llama",
                          "gguf_architecture": "llama", "parameters": 688_768},
                "quant": p["quant"], "out": out, "out_exists": out in self.exported,
                "modelfile": f"{HOME}/exports/Modelfile" if p["ollama"] else "",
                "disk": {"need_bytes": 65 * 1024**2, "free_bytes": 50 * 1024**3}, "size_bytes": 851_424,
                "llama_cpp": False, "refusal": refusal, "warnings": []}

    async def call(self, params, timeout=30.0):
        from tui.widgets.chat.backend_call import params_of

        method, p = params.METHOD, params_of(params)
        if method == "export.plan":
            self.sent.append(params)
            return self.export_plan(p)
        if method == "export.start":
            self.sent.append(params)
            plan = self.export_plan(p)
            if plan["refusal"]:
                raise RequestFailed(P.Reply("r", "refused", reason=plan["refusal"]))
            if plan["out_exists"] and not p["overwrite"]:
                raise RequestFailed(P.Reply("r", "refused", {"out": plan["out"]}, code="confirm",
                                            reason=f"{plan['out']} exists: confirm to overwrite it"))
            job = f"export{next(self.ids)}"
            asyncio.get_running_loop().call_soon(self._export, job, p, plan)
            return {"job_id": job, "session": "s1"}
        return await super().call(params, timeout)

    def _export(self, job: str, p: dict[str, Any], plan: dict[str, Any]) -> None:
        self.exported.add(plan["out"])
        self.post("job.started", {"job_id": job, "kind": "export.start", "params": p})
        for done in (0, 10, 20):
            self.post("job.progress", {"job_id": job, "stage": "writing", "done": done, "total": 20, "unit": "tensors"})
        saved = {"path": plan["out"], "size_bytes": 851_424, "quant": p["quant"], "write_s": 0.75, "tensors": 20,
                 "modelfile": plan["modelfile"], "merged_folder": p["model"], "notes": []}
        self.post("export.saved", saved)
        verified = {"path": plan["out"], "quant": p["quant"], "noise_floor": 0.0029, "noise_dtype": "fp16",
                    "texts": "the 4 verification prompts", "prompts": 4, "dtype": "fp32",
                    "checks": {"chat_template": True, "eos": True, "conversation_tokens": True,
                               "modelfile_template": True},
                    "rows": [{"model": "merged", "perplexity": 823.468, "max_abs_logit_diff": None,
                              "top1_agreement": None, "greedy_same": None, "size_bytes": 2_757_000},
                             {"model": f"gguf {p['quant']}", "perplexity": 824.261, "max_abs_logit_diff": 0.0628,
                              "top1_agreement": 1.0, "greedy_same": "4/4", "size_bytes": 851_424}]}
        self.post("export.verified", verified)
        self.post("job.finished", {"job_id": job, "kind": "export.start", "status": "done", "elapsed_s": 3.5,
                                   "result": {**saved, "verify": verified}})


def test_the_export_step_by_keyboard(qlw_home):
    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=SIZE) as pilot:
            fake = FakeExport(app)
            pane = await open_merge(pilot, fake)
            assert all(b.id and b.tooltip for b in MergePane.BINDINGS)
            await pilot.press("enter")
            await until(pilot, lambda: pane.plan is not None, "the merge plan")
            await pilot.press("ctrl+n")
            await pilot.press("f5")
            await until(pilot, lambda: pane.step == VERIFY and not pane.merge_job, "the merge")
            await pilot.press("ctrl+n")
            await until(pilot, lambda: pane.step == UPLOAD, "step 5")
            await pilot.press("ctrl+n")
            # Step 6: the plan of the default level, q8_0, with an Ollama Modelfile.
            await until(pilot, lambda: pane.step == EXPORT and pane.export_plan is not None, "the export plan")
            assert "6 Export" in str(pane.query_one("#merge-steps").render())
            assert app.focused is pane.export_step.query_one("#export-quant")
            assert fake.of("export.plan")[0] == {"model": MERGED, "out": "", "quant": "q8_0", "ollama": True}
            line = text_of(pane, "#export-plan")
            assert line.startswith(f"→ {HOME}/exports/ab12cd34-adapter-merged-q8_0.gguf\nllama → GGUF llama · about "
                                   "831.47 KiB")
            assert f"Modelfile {HOME}/exports/Modelfile" in line
            keys = {b.binding.action for b in app.screen.active_bindings.values() if b.enabled and b.node is pane}
            assert keys == {"back", "export"}
            # A k-quant without the extra: the plan and the start both name the command.
            pane.export_step.query_one("#export-quant", Select).value = "q4_k_m"
            await until(pilot, lambda: fake.of("export.plan")[-1]["quant"] == "q4_k_m", "the k-quant plan")
            await until(pilot, lambda: COMMAND in text_of(pane, "#export-plan"), "the refusal line")
            assert text_of(pane, "#export-plan").startswith("✖ q4_k_m is a k-quant")
            await pilot.press("f5")
            await until(pilot, lambda: pane.status_text.startswith("✖ not exported"), "the refused start")
            assert COMMAND in pane.status_text and not pane.export_job
            # q8_0: progress, the saved file, the read-back table.
            pane.export_step.query_one("#export-quant", Select).value = "q8_0"
            await pilot.pause()
            await pilot.press("f5")
            await until(pilot, lambda: pane.export_verified is not None and not pane.export_job, "the export")
            assert fake.of("export.start")[-1] == {"model": MERGED, "out": "", "quant": "q8_0", "ollama": True,
                                                   "verify": True, "overwrite": False, "prompts": []}
            assert rows(pane.export_step.table) == [
                ["merged", "823.4680", "—", "—", "—", "2.63 MiB"],
                ["gguf q8_0", "824.2610", "6.280e-02", "100.0%", "4/4", "831.47 KiB"]]
            summary = text_of(pane, "#export-line")
            assert "noise floor of a fp16 file: max |Δlogit| 2.900e-03" in summary
            assert ("inside: chat template ✔ · EOS ✔ · conversation tokenised the same ✔ · Modelfile TEMPLATE the "
                    "same ✔") in summary
            assert text_of(pane, "#export-stage") == (f"✔ exported in 3.5 s: {HOME}/exports/"
                                                      "ab12cd34-adapter-merged-q8_0.gguf")
            bar = pane.export_step.query_one("#export-progress")
            assert bar.display and bar.total == 20 and bar.progress == 20
            # Again to the same file: asked first, then replaced.
            await pilot.press("f5")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirm")
            await pilot.press("y")
            await until(pilot, lambda: len(fake.of("export.start")) == 4 and not pane.export_job, "the overwrite")
            assert [s["overwrite"] for s in fake.of("export.start")[-2:]] == [False, True]
            # A file name of one's own, and no Modelfile.
            pane.export_step.query_one("#export-out", Input).value = "tiny.gguf"
            pane.export_step.query_one("#export-ollama").value = False
            await until(pilot, lambda: fake.of("export.plan")[-1] == {"model": MERGED, "out": "tiny.gguf",
                                                                      "quant": "q8_0", "ollama": False}, "the plan")
            await pilot.press("ctrl+b")
            assert pane.step == UPLOAD
        await app.backend.stop()

    asyncio.run(body())


def test_real_backend_exports_the_merged_folder_from_step_6(backend_with_tiny):
    """Step 6 against a real backend: the tiny model's folder stands for the merged one; f5 writes
    a q8_0 file and the read-back table arrives with every check passed."""
    from pathlib import Path

    from backend import tiny

    home = backend_with_tiny
    folder = str(tiny.tiny_model_path(home))

    async def body():
        app = make_app(home)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.connection.state == "connected", "connected", timeout=20)
            app.screen.action_show_tab("merge")
            pane = app.screen.query_one(MergePane)
            pane.saved = {"out": folder, "files": [], "size_bytes": 0}  # as merge.saved would leave it
            pane.go(EXPORT)
            await until(pilot, lambda: pane.export_plan is not None, "the export plan", timeout=30)
            assert pane.export_plan["out"] == str(home / "exports" / "qlw-tiny-llama-q8_0.gguf")
            await pilot.press("f5")
            await until(pilot, lambda: pane.export_verified is not None and not pane.export_job, "the export",
                        timeout=200)
            table = rows(pane.export_step.table)
            assert [r[0] for r in table] == ["merged", "gguf q8_0"]
            assert float(table[1][2]) < 0.25
            assert "chat template ✔ · EOS ✔ · conversation tokenised the same ✔ · Modelfile TEMPLATE the same ✔" \
                in text_of(pane, "#export-line")
        await app.backend.stop()

    asyncio.run(asyncio.wait_for(body(), 300))
    assert Path(home / "exports" / "qlw-tiny-llama-q8_0.gguf").is_file()
    assert (home / "exports" / "Modelfile").is_file()
