"""The PostgreSQL outbox schema as numbered migrations (`ferry_schema.version` = how many have run).

Append new migrations; never edit one that has shipped. `daemon.store.postgres.connect` runs the
missing ones once, under `pg_advisory_lock(SCHEMA_LOCK)`, so nodes starting together never race;
a node whose code knows fewer migrations than the database has refuses to start.

The tables are SQLite's (`daemon.store.schema`, same names and meanings) with PostgreSQL types,
and these differences:
    deliveries  `lease_owner`/`lease_until`: the node that claimed a pending delivery and until when
                (`daemon.store.postgres.deliveries`); `order_number`/`order_string` hold an ordered
                sink's version (SQLite keeps either in one column without affinity)
    key_versions  the same split of `version` into `number`/`string`
    events      `seq` comes from the sequence `events_seq` (never reused, like AUTOINCREMENT)

Migration 2 adds `deliveries_heads` (each key's head of an ordered sink is the first entry of its
key's range, so the ordered fetch walks keys, not the backlog) and `deliveries_unkeyed`, and
drops `deliveries_by_key` (the heads index leads with its columns).

Migration 3 holds the cluster's own tables, which are not the outbox's (SQLite has none of them, and
`ferry store copy` leaves them out: `CLUSTER_TABLES`): `ferry_nodes`, `ferry_leases`,
`ferry_pauses`, `ferry_drains` (`daemon.store.leases`) and `ferry_rate_budgets`
(`daemon.store.pg_budgets`). Before it, those modules created them on first use; the migration
creates them `IF NOT EXISTS`, under the advisory locks those modules took, so a database where a
node of the previous version already made them is upgraded in place, rows and all.

Migration 4 adds `ferry_node_metrics`: each node's metrics as it last published them, so the
alerter (one node's singleton) evaluates rules on the whole cluster's.
"""

from __future__ import annotations

from typing import Final

SCHEMA_LOCK: Final = 0x46455259_0001
"""The advisory lock migrations run under ("FERY" + 1)."""
EVENTS_LOCK: Final = 0x46455259_0002
"""The advisory lock every transaction that inserts events holds until it commits: events commit in
seq order, so a transform's cursor (`seq > position`) never passes an event still uncommitted."""

_LEGACY_CLUSTER_LOCK: Final = 0x66657272
_LEGACY_BUDGETS_LOCK: Final = 0x66657272_79627564

MIGRATIONS: Final[list[list[str]]] = [
    [
        "CREATE SEQUENCE events_seq",
        """CREATE TABLE events (
            seq bigint PRIMARY KEY,
            id text NOT NULL,
            stream text NOT NULL,
            payload bytea NOT NULL,
            trace text,
            received_at double precision NOT NULL
        )""",
        "CREATE INDEX events_by_stream ON events(stream, seq)",
        """CREATE TABLE deliveries (
            rowid bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id text NOT NULL,
            event_seq bigint NOT NULL,
            stage text NOT NULL,
            state smallint NOT NULL DEFAULT 0,
            attempts integer NOT NULL DEFAULT 0,
            created_at double precision NOT NULL,
            next_attempt_at double precision NOT NULL,
            finished_at double precision,
            last_status integer,
            last_error text,
            last_latency double precision,
            last_response text,
            order_key text COLLATE "C",
            order_number double precision,
            order_string text COLLATE "C",
            order_claimed smallint,
            lease_owner text,
            lease_until double precision
        )""",
        "CREATE INDEX deliveries_due ON deliveries(stage, next_attempt_at, rowid) WHERE state = 0",
        "CREATE INDEX deliveries_done ON deliveries(finished_at) WHERE state = 1",
        "CREATE INDEX deliveries_stale ON deliveries(finished_at) WHERE state = 3",
        "CREATE INDEX deliveries_by_event ON deliveries(event_seq)",
        "CREATE INDEX deliveries_dead ON deliveries(id) WHERE state = 2",
        "CREATE INDEX deliveries_by_key ON deliveries(stage, order_key) "
        "WHERE state = 0 AND order_key IS NOT NULL",
        "CREATE TABLE cursors (name text PRIMARY KEY, position bigint NOT NULL)",
        """CREATE TABLE dedup (
            source text NOT NULL,
            key text NOT NULL,
            event_id text NOT NULL,
            created_at double precision NOT NULL,
            PRIMARY KEY (source, key)
        )""",
        "CREATE INDEX dedup_by_age ON dedup(created_at)",
        """CREATE TABLE audit (
            rowid bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            at double precision NOT NULL,
            uid integer,
            pid integer,
            command text NOT NULL,
            arguments text NOT NULL,
            outcome text NOT NULL
        )""",
        """CREATE TABLE replays (
            n bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            at double precision NOT NULL,
            source text NOT NULL,
            since double precision,
            until double precision,
            sinks text NOT NULL
        )""",
        """CREATE TABLE auth_tokens (
            owner text PRIMARY KEY,
            token bytea NOT NULL,
            seed text NOT NULL,
            updated_at double precision NOT NULL
        )""",
        "CREATE TABLE store_keys (kid text PRIMARY KEY, added_at double precision NOT NULL)",
        """CREATE TABLE replay_keys (
            source text NOT NULL,
            key text NOT NULL,
            until double precision NOT NULL,
            PRIMARY KEY (source, key)
        )""",
        "CREATE INDEX replay_keys_until ON replay_keys(until)",
        """CREATE TABLE key_versions (
            stage text NOT NULL,
            key text COLLATE "C" NOT NULL,
            number double precision,
            string text COLLATE "C",
            delivered_at double precision NOT NULL,
            PRIMARY KEY (stage, key)
        )""",
        """CREATE TABLE windows (
            transform text NOT NULL,
            id bigint NOT NULL,
            key text NOT NULL,
            opened_at double precision NOT NULL,
            size integer NOT NULL,
            PRIMARY KEY (transform, id)
        )""",
        """CREATE TABLE window_events (
            transform text NOT NULL,
            "window" bigint NOT NULL,
            n integer NOT NULL,
            id text NOT NULL,
            payload bytea NOT NULL,
            trace text,
            PRIMARY KEY (transform, "window", n)
        )""",
        """CREATE TABLE poll_state (
            source text PRIMARY KEY,
            mark text,
            etag text,
            last_modified text,
            validated_url text,
            next_url text,
            cycle_mark text,
            cycle_etag text,
            cycle_last_modified text,
            cycle_url text,
            pages integer NOT NULL DEFAULT 0,
            job text,
            cycles integer NOT NULL DEFAULT 0,
            refreshed double precision,
            cycle_refreshed double precision,
            updated_at double precision NOT NULL
        )""",
        """CREATE TABLE poll_pages (
            source text NOT NULL,
            position integer NOT NULL,
            url text NOT NULL,
            etag text,
            last_modified text,
            next_url text,
            mark text,
            refreshed_at double precision NOT NULL,
            PRIMARY KEY (source, position)
        )""",
        """CREATE TABLE alerts (
            rule text PRIMARY KEY,
            state text NOT NULL,
            updated_at double precision NOT NULL
        )""",
        """CREATE TABLE stage_heads (
            stage text PRIMARY KEY,
            head bigint NOT NULL,
            until bigint NOT NULL,
            attempts integer NOT NULL
        )""",
    ],
    [
        # Each key's head as the first entry of its index range (`deliveries.due_ordered`): the
        # order is the head order (claimed rows first, then version, then rowid).
        "CREATE INDEX deliveries_heads ON deliveries(stage, order_key, (order_claimed IS NULL), "
        "(coalesce(order_number, 0)), (coalesce(order_string, '')), rowid) "
        "WHERE state = 0 AND order_key IS NOT NULL",
        # Its leading columns are `deliveries_by_key`'s: one index to write, and the planner
        # never picks the narrower one to filter a whole key where a range would do.
        "DROP INDEX deliveries_by_key",
        # An ordered sink's rows not yet keyed, without walking its keyed backlog.
        "CREATE INDEX deliveries_unkeyed ON deliveries(stage, next_attempt_at, rowid) "
        "WHERE state = 0 AND order_key IS NULL",
    ],
    [
        # The locks under which the previous version created these tables on first use: a node of
        # that version still running cannot create one while this creates it.
        f"SELECT pg_advisory_xact_lock({_LEGACY_CLUSTER_LOCK})",
        f"SELECT pg_advisory_xact_lock({_LEGACY_BUDGETS_LOCK})",
        """CREATE TABLE IF NOT EXISTS ferry_nodes (
            id text PRIMARY KEY,
            host text NOT NULL,
            address text NOT NULL,
            pid integer NOT NULL,
            started_at timestamptz NOT NULL DEFAULT now(),
            heartbeat_at timestamptz NOT NULL DEFAULT now()
        )""",
        """CREATE TABLE IF NOT EXISTS ferry_leases (
            name text PRIMARY KEY,
            holder text,
            token bigint NOT NULL,
            expires_at timestamptz NOT NULL,
            acquired_at timestamptz NOT NULL DEFAULT now()
        )""",
        """CREATE TABLE IF NOT EXISTS ferry_pauses (
            name text PRIMARY KEY,
            paused_at timestamptz NOT NULL DEFAULT now(),
            by_node text NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS ferry_drains (
            number bigserial PRIMARY KEY,
            by_node text NOT NULL,
            started_at timestamptz NOT NULL DEFAULT now(),
            until timestamptz NOT NULL,
            done_at timestamptz
        )""",
        """CREATE TABLE IF NOT EXISTS ferry_rate_budgets (
            name text PRIMARY KEY,
            tokens double precision NOT NULL,
            stamp timestamptz NOT NULL,
            blocked_until timestamptz NOT NULL DEFAULT '-infinity',
            last_grant integer NOT NULL DEFAULT 0,
            rate_per_s double precision NOT NULL,
            burst integer NOT NULL
        )""",
    ],
    [
        # Each node's metrics as it last published them, read by the alerter on whichever node holds
        # its lease (`actors.alerting.cluster`).
        """CREATE TABLE ferry_node_metrics (
            node text PRIMARY KEY,
            published_at timestamptz NOT NULL DEFAULT now(),
            snapshot bytea NOT NULL
        )""",
    ],
]

VERSION: Final = len(MIGRATIONS)
"""The schema version this code writes and reads."""

CLUSTER_TABLES: Final = (
    "ferry_nodes",
    "ferry_leases",
    "ferry_pauses",
    "ferry_drains",
    "ferry_rate_budgets",
    "ferry_node_metrics",
)
"""Migrations 3 and 4's tables: the cluster's state, not the outbox's (`ferry store copy` has
nothing for them)."""
