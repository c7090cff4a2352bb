"""The chat's widgets; each owns the messages it posts."""

from .bubble import Bubble, Notice
from .prompt import PromptArea
from .sidebar import ConversationList
from .status import StatusBar

__all__ = ["Bubble", "ConversationList", "Notice", "PromptArea", "StatusBar"]
