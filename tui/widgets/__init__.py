"""The chat's widgets; each owns the messages it posts."""

from edgellm.tui.widgets.bubble import Bubble, Notice
from edgellm.tui.widgets.prompt import PromptArea
from edgellm.tui.widgets.sidebar import ConversationList
from edgellm.tui.widgets.status import StatusBar

__all__ = ["Bubble", "ConversationList", "Notice", "PromptArea", "StatusBar"]
