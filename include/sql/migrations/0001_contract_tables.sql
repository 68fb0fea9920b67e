-- The integration contract with the application (DESIGN.md "The integration contract").
-- The application owns these tables and may have created them already, hence IF NOT EXISTS:
-- herald never renames or drops a contract column; it only adds what the pipeline needs (0002+).

CREATE TABLE IF NOT EXISTS users (
    id          bigint PRIMARY KEY,
    email       text,
    timezone    text NOT NULL DEFAULT 'UTC',
    created_at  timestamptz DEFAULT now()
);

CREATE TABLE IF NOT EXISTS user_favorites (
    user_id     bigint NOT NULL,
    entity_type text   NOT NULL,
    entity_id   bigint NOT NULL,
    created_at  timestamptz DEFAULT now(),
    PRIMARY KEY (user_id, entity_type, entity_id)
);

-- No row means enabled.
CREATE TABLE IF NOT EXISTS user_notification_preferences (
    user_id           bigint  NOT NULL,
    notification_type text    NOT NULL,
    enabled           boolean NOT NULL,
    PRIMARY KEY (user_id, notification_type)
);

CREATE TABLE IF NOT EXISTS notification_triggers (
    id           bigserial PRIMARY KEY,
    trigger_type text   NOT NULL,
    entity_type  text,
    entity_id    bigint,
    user_id      bigint,
    priority     text   NOT NULL DEFAULT 'normal' CHECK (priority IN ('normal', 'urgent')),
    payload      jsonb  NOT NULL DEFAULT '{}',
    status       text   NOT NULL DEFAULT 'pending',
    created_at   timestamptz NOT NULL DEFAULT now(),
    processed_at timestamptz,
    last_error   text
);

-- The inbox. At most one row per (trigger_id, user_id): see the unique index in 0002.
CREATE TABLE IF NOT EXISTS notifications (
    id                bigserial PRIMARY KEY,
    user_id           bigint NOT NULL,
    trigger_id        bigint,
    notification_type text   NOT NULL,
    title             text   NOT NULL,
    body              text   NOT NULL,
    payload           jsonb,
    priority          text   NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    read_at           timestamptz
);
