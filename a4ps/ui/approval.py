"""The approval dialog: a proposed codex amendment that only a human decides.

It names the persona and the principle, shows the current text and the proposed text
side by side under their own labels, the line diff, and the rationale. Approve and
Reject go to the daemon (stamped with the codex version they were made on); "Later"
(or Esc) puts it away and the status bar keeps a button to bring it back. One dialog
is open at a time; the controller keeps the other pending proposals in order.
"""
from __future__ import annotations

from kivy.metrics import dp
from kivy.properties import BooleanProperty, DictProperty, ObjectProperty, StringProperty

from . import values as V
from .panels import FloatingPanel


class ApprovalDialog(FloatingPanel):
    """Shows one proposal; Approve/Reject go to ``controller.decide``."""

    proposal = DictProperty({})
    proposal_id = StringProperty("")
    persona = StringProperty("")
    principle = StringProperty("")
    current_text = StringProperty("")
    proposed_text = StringProperty("")
    base_version = StringProperty("")
    rationale = StringProperty("")
    diff_markup = StringProperty("")
    error = StringProperty("")
    busy = BooleanProperty(False)
    controller = ObjectProperty(None, allownone=True)

    def __init__(self, proposal: dict, **kw):
        kw.setdefault("size", (dp(680), dp(520)))
        kw.setdefault("accent", [0.85, 0.65, 0.25, 1])
        super().__init__(**kw)
        self.show(proposal)

    def show(self, proposal: dict) -> None:
        self.proposal = dict(proposal)
        self.proposal_id = str(proposal_key(proposal))
        self.persona = str(proposal.get("persona") or "")
        self.principle = str(proposal.get("principle_id") or proposal.get("principle") or "")
        self.current_text = str(proposal.get("current_text") or "")
        self.proposed_text = str(proposal.get("proposed_text") or "")
        base = proposal.get("base_version")
        self.base_version = "" if base is None else str(base)
        self.rationale = str(proposal.get("rationale") or "")
        self.diff_markup = V.diff_markup(self.current_text, self.proposed_text)
        self.title = f"Codex amendment for {self.persona}: principle \u201c{self.principle}\u201d"

    def decide(self, approve: bool) -> None:
        if self.busy or self.controller is None:
            return
        self.busy = True
        self.error = ""
        self.controller.decide(self, approve)

    def refused(self, message: str) -> None:
        self.busy = False
        self.error = message

    def on_close(self) -> None:
        if self.controller is not None:
            self.controller.approval_closed(self)


def proposal_key(p: dict) -> str:
    return str(p.get("proposal_id") or p.get("id") or "")
