"""Chat history in SQLite: conversations, their messages, settings and per-reply stats.

WAL and a busy timeout let two `edgellm chat` processes share one database. Each message is committed
when it completes (a stopped reply too, marked "stopped"), so a crash loses at most the reply being
written. The schema is versioned (`schema_migrations`); a database that is not one (corrupt, or
another file) is moved aside with its name kept in `History.moved_aside`, and a new one is made.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edgellm.models import data_dir

BUSY_TIMEOUT_MS = 5000
TITLE_CHARS = 48

MIGRATIONS: Sequence[str] = (
    """
    CREATE TABLE conversations (
        id INTEGER PRIMARY KEY,
        title TEXT NOT NULL,
        model TEXT NOT NULL DEFAULT '',
        settings TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
        content TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'complete' CHECK (status IN ('complete', 'stopped', 'error')),
        stats TEXT,
        created_at REAL NOT NULL
    );
    CREATE INDEX messages_by_conversation ON messages(conversation_id, id);
    """,
)


def default_path() -> Path:
    return data_dir() / "history.sqlite"


@dataclass
class Message:
    role: str
    content: str
    status: str = "complete"
    stats: dict | None = None
    id: int | None = None

    def as_chat(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass
class Conversation:
    id: int
    title: str
    model: str
    settings: dict
    updated_at: float
    messages: list[Message] = field(default_factory=list)


class History:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_path()
        self.moved_aside: Path | None = None  # a corrupt database kept for the user, when there was one
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self.db = self._open()
        except sqlite3.DatabaseError:
            self.moved_aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            self.path.replace(self.moved_aside)
            for suffix in ("-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            self.db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                             check_same_thread=False)
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA foreign_keys = ON")
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            self._migrate(db)
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL)")
        done = {v for (v,) in db.execute("SELECT version FROM schema_migrations")}
        for version, script in enumerate(MIGRATIONS, start=1):
            if version in done:
                continue
            db.execute("BEGIN IMMEDIATE")
            try:
                if db.execute("SELECT 1 FROM schema_migrations WHERE version = ?", (version,)).fetchone():
                    db.execute("ROLLBACK")  # another process migrated first
                    continue
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, time.time()))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    @property
    def schema_version(self) -> int:
        return self.db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]

    # -- conversations --------------------------------------------------------------------------------
    def create(self, model: str = "", settings: dict | None = None, title: str = "New chat") -> Conversation:
        now = time.time()
        cur = self.db.execute("INSERT INTO conversations (title, model, settings, created_at, updated_at) "
                              "VALUES (?, ?, ?, ?, ?)", (title, model, json.dumps(settings or {}), now, now))
        return Conversation(int(cur.lastrowid), title, model, settings or {}, now)

    def conversations(self, search: str = "") -> list[Conversation]:
        """Newest first; `search` matches titles and message text."""
        query = "SELECT id, title, model, settings, updated_at FROM conversations"
        args: tuple = ()
        if search:
            query += (" WHERE title LIKE ?1 ESCAPE '\\' OR id IN "
                      "(SELECT conversation_id FROM messages WHERE content LIKE ?1 ESCAPE '\\')")
            escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            args = (f"%{escaped}%",)
        rows = self.db.execute(query + " ORDER BY updated_at DESC, id DESC", args).fetchall()
        return [Conversation(i, t, m, json.loads(s), u) for i, t, m, s, u in rows]

    def load(self, conversation_id: int) -> Conversation:
        row = self.db.execute("SELECT id, title, model, settings, updated_at FROM conversations WHERE id = ?",
                              (conversation_id,)).fetchone()
        if row is None:
            raise KeyError(conversation_id)
        conversation = Conversation(row[0], row[1], row[2], json.loads(row[3]), row[4])
        conversation.messages = [
            Message(role, content, status, json.loads(stats) if stats else None, mid)
            for mid, role, content, status, stats in self.db.execute(
                "SELECT id, role, content, status, stats FROM messages WHERE conversation_id = ? ORDER BY id",
                (conversation_id,))]
        return conversation

    def last(self) -> Conversation | None:
        row = self.db.execute("SELECT id FROM conversations ORDER BY updated_at DESC, id DESC LIMIT 1").fetchone()
        return self.load(row[0]) if row else None

    def update(self, conversation: Conversation) -> None:
        """Store its model and settings (a system prompt, sampling, the draft) as they are now."""
        conversation.updated_at = time.time()
        self.db.execute("UPDATE conversations SET model = ?, settings = ?, updated_at = ? WHERE id = ?",
                        (conversation.model, json.dumps(conversation.settings), conversation.updated_at,
                         conversation.id))

    # -- messages -------------------------------------------------------------------------------------
    def add(self, conversation: Conversation, message: Message) -> Message:
        """Commit one completed message; the first user message names the conversation."""
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            cur = self.db.execute(
                "INSERT INTO messages (conversation_id, role, content, status, stats, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (conversation.id, message.role, message.content, message.status,
                 json.dumps(message.stats) if message.stats is not None else None, now))
            if message.role == "user" and not any(m.role == "user" for m in conversation.messages):
                conversation.title = title_for(message.content)
            self.db.execute("UPDATE conversations SET title = ?, updated_at = ? WHERE id = ?",
                            (conversation.title, now, conversation.id))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        message.id = int(cur.lastrowid)
        conversation.messages.append(message)
        conversation.updated_at = now
        return message

    def remove_from(self, conversation: Conversation, index: int) -> None:
        """Drop the conversation's messages from `index` on (regenerate, edit and resend)."""
        gone = [m.id for m in conversation.messages[index:] if m.id is not None]
        if gone:
            self.db.execute(f"DELETE FROM messages WHERE id IN ({','.join('?' * len(gone))})", gone)
        del conversation.messages[index:]

    def close(self) -> None:
        self.db.close()


def title_for(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= TITLE_CHARS else line[:TITLE_CHARS - 1].rstrip() + "…"
