"""The password policy: at least ``MIN_LENGTH`` characters, and a zxcvbn strength score of at least
``MIN_SCORE`` (of 4), so common passwords, keyboard walks, repeats and dates are refused whatever their
length. zxcvbn (Dropbox's estimator) ships its own word lists: nothing is fetched. It judges the first
``JUDGED_CHARS`` characters only (its cost grows fast with length; a longer password whose start is strong
is stronger still), and the user's own email and name count as guessable words.

Applied wherever a password is set: a new admin (CLI and STUDIO_ADMIN_PASSWORD), an invited user's
account, a password change. Logging in with an older, weaker password still works.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterable

from zxcvbn import zxcvbn

MIN_LENGTH = 10
MIN_SCORE = 3  # zxcvbn: 0 too guessable ... 3 safely unguessable (~10^10 guesses) ... 4 very unguessable
MAX_LENGTH = 200  # what the login form and the request schemas accept
JUDGED_CHARS = 72  # zxcvbn's own default limit
PRODUCT_WORDS = ("studio", "fine-tuning", "finetuning", "fine tuning")
POLICY = f"at least {MIN_LENGTH} characters, and not easy to guess (zxcvbn strength {MIN_SCORE} of 4 or more)"

# zxcvbn keeps the user inputs of the call in module state: one estimate at a time.
_lock = threading.Lock()


def password_problem(password: str, user_inputs: Iterable[str] = ()) -> str | None:
    """Why ``password`` is refused (a sentence for the caller, with zxcvbn's advice), or None."""
    problems = []
    if len(password) < MIN_LENGTH:
        problems.append(f"must be at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        problems.append(f"must be at most {MAX_LENGTH} characters")
    inputs = [*PRODUCT_WORDS, *(part for value in user_inputs if value for part in _words(value))]
    with _lock:
        result = zxcvbn(password[:JUDGED_CHARS], user_inputs=inputs)
    if result["score"] < MIN_SCORE:
        feedback = result["feedback"]
        advice = " ".join(s for s in [feedback.get("warning"), *feedback.get("suggestions", [])] if s)
        problems.append(
            f"is too easy to guess (strength {result['score']} of 4; {MIN_SCORE} needed)"
            + (f": {advice}" if advice else "")
        )
    return "; ".join(problems) or None


def _words(value: str) -> list[str]:
    """An email or a name, whole and in parts: 'ada.lovelace@example.com' also gives 'ada', 'lovelace'."""
    local = value.partition("@")[0]
    parts = [p for p in local.replace(".", " ").replace("-", " ").replace("_", " ").split() if len(p) > 2]
    return [value, local, *parts]


def generate_password() -> str:
    """A random password that passes the policy (24 URL-safe characters: 144 bits)."""
    while True:
        password = secrets.token_urlsafe(18)
        if password_problem(password) is None:
            return password
