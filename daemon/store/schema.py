"""The outbox schema as numbered migrations (`PRAGMA user_version` = how many have run).

Append new migrations; never edit one that has shipped.

Tables:
    events      every event a source or transform produced; `seq` orders them (AUTOINCREMENT, so a
                pruned seq is never reused and transform cursors stay valid)
    deliveries  one row per (event, stage): a sink's delivery, or a transform's dead letter.
                state 0 pending, 1 delivered, 2 dead; `id` is the stable idempotency key;
                `last_latency` (s) and `last_response` (an excerpt) describe the last attempt
    cursors     each transform's position in the events it reads
    dedup       webhook idempotency keys seen per source
    audit       control commands (who, what, outcome)
    replays     one row per `ferry ctl replay`; its number `n` goes into the new delivery ids
    auth_tokens each OAuth2 owner's current (rotated) refresh token, encrypted with the payloads
    store_keys  ids of the encryption keys ever used to write (`daemon.store.at_rest`)
    replay_keys what verified webhooks signed, remembered within their tolerance to refuse replays
    windows     an aggregating transform's open windows: group key (JSON), opened at, size
    window_events  the events in each open window, in order, with the id their output will take
    key_versions  per (ordered sink, record key): the highest version delivered (daemon/store/ordering.py)
    poll_state  each poll source's mark, validators and the cycle in progress (daemon/store/poll.py)
    poll_pages  each poll source's per-page validators and next URLs, positions 1..N (bounded)
    alerts      each alert rule's state (JSON), kept across restarts
    stage_heads the event each stage was working on when it last (re)started (daemon/store/quarantine.py)

A delivery of a sink with `ordering` carries `order_key`/`order_version` (NULL elsewhere) and may
end in state 3, stale: never sent, because a newer version of its record was delivered first.
"""

from __future__ import annotations

from daemon.store.types import DEAD, DELIVERED, PENDING, STALE, STATE_NAMES

APPLICATION_ID = 0x46455259  # "FERY": marks the file as ferry's


MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL,
            stream TEXT NOT NULL,
            payload BLOB NOT NULL,
            trace TEXT,
            received_at REAL NOT NULL
        )""",
        "CREATE INDEX events_by_stream ON events(stream, seq)",
        """CREATE TABLE deliveries (
            rowid INTEGER PRIMARY KEY,
            id TEXT NOT NULL,
            event_seq INTEGER NOT NULL,
            stage TEXT NOT NULL,
            state INTEGER NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            next_attempt_at REAL NOT NULL,
            finished_at REAL,
            last_status INTEGER,
            last_error TEXT
        )""",
        "CREATE INDEX deliveries_due ON deliveries(stage, next_attempt_at) WHERE state = 0",
        "CREATE INDEX deliveries_done ON deliveries(finished_at) WHERE state = 1",
        "CREATE INDEX deliveries_by_event ON deliveries(event_seq)",
        "CREATE TABLE cursors (name TEXT PRIMARY KEY, position INTEGER NOT NULL) WITHOUT ROWID",
        """CREATE TABLE dedup (
            source TEXT NOT NULL,
            key TEXT NOT NULL,
            event_id TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (source, key)
        ) WITHOUT ROWID""",
        """CREATE TABLE audit (
            rowid INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            uid INTEGER,
            pid INTEGER,
            command TEXT NOT NULL,
            arguments TEXT NOT NULL,
            outcome TEXT NOT NULL
        )""",
    ],
    [
        """CREATE TABLE replays (
            n INTEGER PRIMARY KEY AUTOINCREMENT,
            at REAL NOT NULL,
            source TEXT NOT NULL,
            since REAL,
            until REAL,
            sinks TEXT NOT NULL
        )""",
    ],
    [
        # Dead letters are found by `ferry ctl dlq …` (always `state = 2`); without this every
        # such command scanned the whole table on the writer thread. Rows enter it only when
        # they die, so ingest and delivery pay nothing for it.
        "CREATE INDEX deliveries_dead ON deliveries(id) WHERE state = 2",
    ],
    [
        # A rotated OAuth2 refresh token must survive a crash (daemon.http.auth); `seed` fingerprints the
        # configured token it descends from, so a new one in the config wins over the stored one.
        """CREATE TABLE auth_tokens (
            owner TEXT PRIMARY KEY,
            token BLOB NOT NULL,
            seed TEXT NOT NULL,
            updated_at REAL NOT NULL
        ) WITHOUT ROWID""",
        "CREATE TABLE store_keys (kid TEXT PRIMARY KEY, added_at REAL NOT NULL) WITHOUT ROWID",
    ],
    [
        # Replay protection of verified webhooks (actors/webhook/verify.py): a digest of what the sender
        # signed, remembered until its signed timestamp leaves the tolerance; pruned past `until`.
        """CREATE TABLE replay_keys (
            source TEXT NOT NULL,
            key TEXT NOT NULL,
            until REAL NOT NULL,
            PRIMARY KEY (source, key)
        )""",
        "CREATE INDEX replay_keys_until ON replay_keys(until)",
    ],
    [
        # Per-key ordering (daemon/store/ordering.py). Both indexes are partial: rows of sinks without
        # `ordering` never enter them, so the unordered path maintains nothing new.
        "ALTER TABLE deliveries ADD COLUMN order_key TEXT",
        "ALTER TABLE deliveries ADD COLUMN order_version",  # no affinity: REAL or TEXT as stored
        "ALTER TABLE deliveries ADD COLUMN order_claimed INTEGER",  # 1 once handed to the sender
        "CREATE INDEX deliveries_by_key ON deliveries(stage, order_key, order_version) "
        "WHERE state = 0 AND order_key IS NOT NULL",
        "CREATE INDEX deliveries_stale ON deliveries(finished_at) WHERE state = 3",
        """CREATE TABLE key_versions (
            stage TEXT NOT NULL,
            key TEXT NOT NULL,
            version NOT NULL,
            delivered_at REAL NOT NULL,
            PRIMARY KEY (stage, key)
        ) WITHOUT ROWID""",
    ],
    [
        # Confirmation: what the receiver answered to the last attempt, and how long it took.
        "ALTER TABLE deliveries ADD COLUMN last_latency REAL",
        "ALTER TABLE deliveries ADD COLUMN last_response TEXT",
        # Aggregation windows (daemon/store/windows.py): open windows and the events in them.
        """CREATE TABLE windows (
            transform TEXT NOT NULL,
            id INTEGER NOT NULL,
            key TEXT NOT NULL,
            opened_at REAL NOT NULL,
            size INTEGER NOT NULL,
            PRIMARY KEY (transform, id)
        ) WITHOUT ROWID""",
        """CREATE TABLE window_events (
            transform TEXT NOT NULL,
            window INTEGER NOT NULL,
            n INTEGER NOT NULL,
            id TEXT NOT NULL,
            payload BLOB NOT NULL,
            trace TEXT,
            PRIMARY KEY (transform, window, n)
        ) WITHOUT ROWID""",
    ],
    [
        # One row per poll source; its keys share the `dedup` table with webhook sources.
        """CREATE TABLE poll_state (
            source TEXT PRIMARY KEY,
            mark TEXT,
            etag TEXT,
            last_modified TEXT,
            validated_url TEXT,
            next_url TEXT,
            cycle_mark TEXT,
            cycle_etag TEXT,
            cycle_last_modified TEXT,
            cycle_url TEXT,
            pages INTEGER NOT NULL DEFAULT 0,
            job TEXT,
            cycles INTEGER NOT NULL DEFAULT 0,
            updated_at REAL NOT NULL
        ) WITHOUT ROWID""",
    ],
    [
        # One row per alert rule: its state as JSON (actors.alerting.rules.AlertState), so a restart
        # resumes a firing alert without notifying again.
        """CREATE TABLE alerts (
            rule TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            updated_at REAL NOT NULL
        ) WITHOUT ROWID""",
    ],
    [
        # Conditional requests for every page of a listing (actors/poll/checks.py): each page's
        # validators, the next URL its answer led to and its highest mark, by position in the
        # listing (at most `CHECKED_PAGES` rows a source); written with the page's items.
        """CREATE TABLE poll_pages (
            source TEXT NOT NULL,
            position INTEGER NOT NULL,
            url TEXT NOT NULL,
            etag TEXT,
            last_modified TEXT,
            next_url TEXT,
            mark TEXT,
            refreshed_at REAL NOT NULL,
            PRIMARY KEY (source, position)
        ) WITHOUT ROWID""",
        # When the pages of the last complete listing (and of the one in progress) were last read
        # in full: validators are trusted only while the keys they stand for are remembered.
        "ALTER TABLE poll_state ADD COLUMN refreshed REAL",
        "ALTER TABLE poll_state ADD COLUMN cycle_refreshed REAL",
    ],
    [
        # Crash quarantine (daemon/store/quarantine.py): the event at the head of each stage when an
        # incarnation began work on it, and how many incarnations did so without passing it.
        """CREATE TABLE stage_heads (
            stage TEXT PRIMARY KEY,
            head INTEGER NOT NULL,
            until INTEGER NOT NULL,
            attempts INTEGER NOT NULL
        ) WITHOUT ROWID""",
    ],
]

__all__ = ["APPLICATION_ID", "DEAD", "DELIVERED", "MIGRATIONS", "PENDING", "STALE", "STATE_NAMES"]
