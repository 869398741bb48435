"""How the server will lex one session's statement text: its standard_conforming_strings.

With the setting off, a backslash in a plain ``'...'`` literal escapes the next character, so
the proxy's parser (pglast, which lexes with it on) could end a literal where the server does
not, and miss a write the server then runs. The server reports the setting in ParameterStatus
at start and whenever it changes, just before the ReadyForQuery that ends the cycle which
changed it. So the value the proxy holds is the server's as long as every message sent has
been answered; a message still in flight (a pipeline, or a batch not yet synced) may be
changing it. Then a text that the two settings lex differently is *ambiguous*, and gets the
mapping's ``unsupported`` policy rather than a guess.

No I/O here: the session passes each ParameterStatus in, and says whether it is settled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from core.sqllex import Respelled, Unlexable, lexes_alike, neutral_text

#: the text means the same under both settings: parse it as sent
AS_SENT: Final = "as_sent"
#: parse (and send) the respelled text, which means what the server would read
RESPELLED: Final = "respelled"
#: the setting may be changing and the two settings read the text differently; or, with it
#: off, the text does not lex at all (the server refuses it: nothing may be added to it, as
#: an open literal would swallow the addition). Either way: the ``unsupported`` policy.
AMBIGUOUS: Final = "ambiguous"


@dataclass(frozen=True, slots=True)
class Reading:
    """What a statement text is to the server: how to parse it and what to send."""

    kind: str
    #: the text to parse (the respelled one for RESPELLED)
    text: str
    respelled: Respelled | None = None


class SessionLexing:
    """The lexing settings of one session, as the server last reported them."""

    def __init__(self) -> None:
        self.standard_conforming_strings = True

    def server_parameter(self, name: str, value: str) -> None:
        if name == "standard_conforming_strings":
            self.standard_conforming_strings = value.lower() == "on"

    def read(self, text: str, *, settled: bool, standard: bool | None = None) -> Reading:
        """How the server reads ``text`` now (``settled``: no reply outstanding), or as it
        read it when the setting was ``standard`` (a statement prepared back then)."""
        if standard is None:
            if not settled:
                return Reading(AS_SENT if lexes_alike(text) else AMBIGUOUS, text)
            standard = self.standard_conforming_strings
        if standard and "\\" not in text:
            return Reading(AS_SENT, text)  # the usual case: nothing to scan
        try:
            respelled = neutral_text(text, standard_conforming_strings=standard)
        except Unlexable:
            return Reading(AS_SENT if standard else AMBIGUOUS, text)
        if respelled is None:
            return Reading(AS_SENT, text)
        return Reading(RESPELLED, respelled.text, respelled)
