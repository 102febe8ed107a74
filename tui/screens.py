"""Modal screens: help, per-conversation settings, rename, confirm, and the model panel with verification."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, ProgressBar, Static, TextArea

from runtime.errors import EdgepackError
from runtime.generation import SamplingSettings

# (keys, what) for the help screen; the bindings themselves live on the widgets and the app.
HELP_KEYS = [
    ("Writing", None),
    ("Enter", "send the message"),
    ("Ctrl+J, Shift+Enter", "new line (Shift+Enter only where the terminal tells it from Enter)"),
    ("Up / Down", "previous / next prompt (on the first / last line)"),
    ("Esc", "stop the reply; what was written is kept"),
    ("Conversation", None),
    ("Ctrl+R", "regenerate the last reply"),
    ("Ctrl+L", "copy the last reply to the clipboard"),
    ("Ctrl+S", "system prompt, temperature, top-p, max tokens"),
    ("Ctrl+N", "new conversation"),
    ("F2", "rename the conversation"),
    ("F3", "export the conversation as Markdown"),
    ("F8", "delete the conversation"),
    ("Window", None),
    ("Ctrl+B", "show / hide the conversation list"),
    ("Tab / Shift+Tab", "move between the list and the prompt"),
    ("In the list", "Enter open, r rename, d delete, e export, n new"),
    ("Ctrl+O", "the model: recipe, size, claimed quality, verify"),
    ("Ctrl+P", "command palette"),
    ("F1, ?", "this help"),
    ("Ctrl+Q", "quit (conversations are saved as you go)"),
]


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q,question_mark", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        for keys, what in HELP_KEYS:
            if what is None:
                table.add_row(Text(keys, style="underline"), "")
            else:
                table.add_row(keys, what)
        with VerticalScroll(id="help-dialog", classes="dialog") as box:
            box.border_title = "Keys"
            box.border_subtitle = "Esc to close"
            yield Static(table)


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [Binding("escape,n", "no", "No"), Binding("y", "yes", "Yes")]

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-dialog", classes="dialog small"):
            yield Label(Text(self.question))
            with Horizontal(classes="buttons"):
                yield Button("Delete", variant="error", id="yes", compact=True)
                yield Button("Cancel", id="no", compact=True)

    def action_yes(self) -> None:
        self.dismiss(True)

    def action_no(self) -> None:
        self.dismiss(False)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class RenameScreen(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str):
        super().__init__()
        self.current = title

    def compose(self) -> ComposeResult:
        with Vertical(id="rename-dialog", classes="dialog small") as box:
            box.border_title = "Rename conversation"
            box.border_subtitle = "Enter to save, Esc to cancel"
            yield Input(self.current, id="title")

    def on_mount(self) -> None:
        title = self.query_one("#title", Input)
        title.focus()
        title.select_all()  # typing replaces the old title; arrows edit it

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


def _float(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise EdgepackError(f"{name}: {text!r} is not a number") from None


class SettingsScreen(ModalScreen[dict | None]):
    """System prompt, temperature, top-p and max new tokens of one conversation. Dismisses with
    {"system_prompt": str | None, "settings": {...}} or None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save")]

    def __init__(
        self,
        system_prompt: str | None,
        settings: SamplingSettings,
        defaults: SamplingSettings,
        default_system_prompt: str | None,
    ):
        super().__init__()
        self.system_prompt, self.settings = system_prompt, settings
        self.defaults, self.default_system_prompt = defaults, default_system_prompt

    def compose(self) -> ComposeResult:
        s = self.settings
        with Vertical(id="settings-dialog", classes="dialog") as box:
            box.border_title = "Conversation settings"
            box.border_subtitle = "Ctrl+S save · Esc cancel"
            yield Label("System prompt (empty = none)")
            yield TextArea(self.system_prompt or "", id="system", soft_wrap=True, compact=True)
            with Horizontal(id="sampling"):
                for wid, label, value in (
                    ("temperature", "Temperature", s.temperature),
                    ("top_p", "Top-p", s.top_p),
                    ("max_new_tokens", "Max new tokens", s.max_new_tokens),
                ):
                    with Vertical():
                        yield Label(label)
                        yield Input(f"{value:g}", id=wid, compact=True)
            d = self.defaults
            yield Static(
                Text(
                    f"temperature 0 = greedy, top-p 1 = no cut; bundle defaults {d.temperature:g} / "
                    f"{d.top_p:g} / {d.max_new_tokens}",
                    style="dim",
                )
            )
            yield Label("", id="settings-error")
            with Horizontal(classes="buttons"):
                yield Button("Save", variant="primary", id="save", compact=True)
                yield Button("Bundle defaults", id="defaults", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def collect(self) -> dict:
        """The form's values, checked with SamplingSettings.check (raises EdgepackError)."""
        temperature = _float(self.query_one("#temperature", Input).value, "temperature")
        top_p = _float(self.query_one("#top_p", Input).value, "top-p")
        max_tokens = _float(self.query_one("#max_new_tokens", Input).value, "max new tokens")
        if max_tokens != int(max_tokens):
            raise EdgepackError(f"max new tokens: {max_tokens:g} is not a whole number")
        settings = {"temperature": temperature, "top_p": top_p, "max_new_tokens": int(max_tokens)}
        SamplingSettings(**{**vars(self.defaults), **settings}).check()
        system = self.query_one("#system", TextArea).text.strip()
        return {"system_prompt": system or None, "settings": settings}

    def action_save(self) -> None:
        try:
            result = self.collect()
        except EdgepackError as e:
            self.query_one("#settings-error", Label).update(Text(str(e), style="bold red"))
            return
        self.dismiss(result)

    def action_cancel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#save")
    def _save(self) -> None:
        self.action_save()

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#defaults")
    def _defaults(self) -> None:
        d = self.defaults
        self.query_one("#system", TextArea).load_text(self.default_system_prompt or "")
        self.query_one("#temperature", Input).value = f"{d.temperature:g}"
        self.query_one("#top_p", Input).value = f"{d.top_p:g}"
        self.query_one("#max_new_tokens", Input).value = f"{d.max_new_tokens:g}"


# ---------------------------------------------------------------------------------------------------------
# Model panel


def fmt_number(x) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"
    return str(x)


def fmt_parameters(n) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return "—"
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


def model_table(info: dict) -> Table:
    """The facts of describe() as a two-column grid."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("Model", Text(str(info.get("name", "?"))))
    stages = info.get("stages") or []
    recipe = Text(str(info.get("recipe") or "—"), style="bold")
    for stage in stages:
        recipe.append("\n" + str(stage), style="")
    table.add_row("Recipe", recipe)
    size = info.get("size_text") or (fmt_number(info.get("size_bytes")) + " bytes")
    table.add_row("Size", f"{size} · {fmt_parameters(info.get('parameters'))} parameters")
    if info.get("context_length"):
        table.add_row("Context", f"{info['context_length']:,} tokens")
    if info.get("created_by"):
        table.add_row("Made by", Text(str(info["created_by"])))
    if info.get("path"):
        table.add_row("Path", Text(str(info["path"])))
    return table


def fmt_metric(metric: str, value) -> str:
    if value is None:
        return "—"
    from runtime.bundle import format_metric

    return format_metric(metric, float(value))


def fmt_tolerance(metric: str, tol) -> str:
    if tol is None:
        return ""
    return f"±{tol:.4f}" if metric in ("ppl", "kld") else f"±{100 * tol:.1f} pt"


def claims_table(info: dict) -> Table:
    """The headline quality the bundle claims (its "full" evaluation)."""
    table = Table(expand=True, box=None, padding=(0, 1), header_style="bold")
    table.add_column("Claimed quality", ratio=1)
    table.add_column("Value", justify="right", no_wrap=True)
    table.add_column("Sample", justify="right", no_wrap=True)
    for q in info.get("quality") or []:
        metric = q.get("metric")
        table.add_row(
            Text(q.get("label") or str(metric)),
            q.get("text") or fmt_metric(metric, q.get("value")),
            f"n={q['n']:,}" if q.get("n") else "",
        )
    if not table.row_count:
        table.add_row(Text("the bundle claims no quality", style="dim"), "", "")
    return table


def checks_table(checks: list) -> Table:
    """Verification: per metric, the claim (at the verified level), the re-measured value, the allowed
    difference and pass/fail."""
    table = Table(expand=True, box=None, padding=(0, 1), header_style="bold")
    table.add_column("Quick check", ratio=1)
    table.add_column("Claimed", justify="right", no_wrap=True)
    table.add_column("Measured", justify="right", no_wrap=True)
    table.add_column("Allowed", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True, width=6)
    for c in checks:
        verdict = Text("✓ pass", style="bold green") if c.passed else Text("✗ FAIL", style="bold red")
        measured = fmt_metric(c.name, c.measured) if c.measured is not None else "—"
        table.add_row(
            Text(getattr(c, "label", c.name)),
            fmt_metric(c.name, c.claimed),
            measured,
            fmt_tolerance(c.name, c.tolerance),
            verdict,
        )
    return table


def check_details(checks: list | None) -> Text:
    """One line per check: how it was measured (the quick claims can use fewer samples than the full ones)."""
    out = Text()
    for c in checks or []:
        mark = ("✓ ", "green") if c.passed else ("✗ ", "red")
        out.append(mark[0], style=mark[1])
        out.append(f"{getattr(c, 'label', c.name)}: {c.detail}\n", style="dim")
    return out


class ModelScreen(ModalScreen[None]):
    """What the bundle is (Bundle.describe()) and whether it still holds the quality it claims: the verify
    action runs in the app's background (it goes on if this panel is closed), this panel shows its state."""

    BINDINGS = [Binding("escape,ctrl+o", "dismiss", "Close"), Binding("v", "verify", "Verify now")]

    def __init__(self, info: dict):
        super().__init__()
        self.info = info
        self._shown_result = False

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="model-dialog", classes="dialog") as box:
            box.border_title = "Model"
            box.border_subtitle = "v verify · Esc close"
            yield Static(model_table(self.info), id="model-facts")
            yield Static(claims_table(self.info), id="claims")
            with Horizontal(id="verify-row"):
                yield Button("Verify now (quick)", id="verify", variant="primary", compact=True)
                yield ProgressBar(id="verify-progress", show_eta=False)
            yield Static(id="verify-status")
            yield Static(id="checks")
            yield Static(id="verify-details")

    def on_mount(self) -> None:
        self.refresh_verify()
        self.set_interval(0.2, self.refresh_verify)

    def refresh_verify(self) -> None:
        state = self.app.verify_state
        if state.checks is not None and not self._shown_result:  # bring the result into view once
            self._shown_result = True
            self.call_after_refresh(self.query_one("#model-dialog").scroll_end, animate=False)
        checks = self.query_one("#checks", Static)
        checks.display = bool(state.checks)
        if state.checks:
            checks.update(checks_table(state.checks))
        bar = self.query_one("#verify-progress", ProgressBar)
        bar.display = state.running or state.checks is not None
        if state.total:
            bar.update(total=state.total, progress=state.done)
        elif state.running:
            bar.update(total=None)
        self.query_one("#verify", Button).disabled = state.running
        self.query_one("#verify-status", Static).update(state.summary())
        self.query_one("#verify-details", Static).update(check_details(state.checks))

    def action_verify(self) -> None:
        if not self.app.verify_state.running:
            self._shown_result = False
        self.app.action_verify()
        self.refresh_verify()

    @on(Button.Pressed, "#verify")
    def _verify(self) -> None:
        self.action_verify()
