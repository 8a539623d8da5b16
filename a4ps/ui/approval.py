"""The approval dialog: a proposed codex amendment, shown as a diff, that only a human decides.

One dialog is open at a time; the controller keeps the other pending proposals in
order and opens the next when this one is decided. ``auto_dismiss`` is off, so a
click outside can't close it (and can't swallow the click on Approve).
"""
from __future__ import annotations

from kivy.properties import BooleanProperty, DictProperty, ObjectProperty, StringProperty
from kivy.uix.modalview import ModalView

from . import values as V


class ApprovalDialog(ModalView):
    """Shows one proposal; Approve/Reject go to ``controller.decide``."""

    proposal = DictProperty({})
    proposal_id = StringProperty("")
    persona = StringProperty("")
    rationale = StringProperty("")
    diff_markup = StringProperty("")
    error = StringProperty("")
    busy = BooleanProperty(False)
    controller = ObjectProperty(None, allownone=True)

    def __init__(self, proposal: dict, **kw):
        kw.setdefault("auto_dismiss", False)
        super().__init__(**kw)
        self.show(proposal)

    def show(self, proposal: dict) -> None:
        self.proposal = dict(proposal)
        self.proposal_id = str(proposal_key(proposal))
        self.persona = str(proposal.get("persona") or "")
        self.rationale = str(proposal.get("rationale") or "")
        self.diff_markup = V.diff_markup(str(proposal.get("current_text") or ""),
                                         str(proposal.get("proposed_text") or ""))

    def decide(self, approve: bool) -> None:
        if self.busy or self.controller is None:
            return
        self.busy = True
        self.error = ""
        self.controller.decide(self, approve)

    def refused(self, message: str) -> None:
        self.busy = False
        self.error = message


def proposal_key(p: dict) -> str:
    return str(p.get("proposal_id") or p.get("id") or "")
