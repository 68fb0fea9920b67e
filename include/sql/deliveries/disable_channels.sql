-- A webhook endpoint answered 410 Gone (Standard Webhooks: disable it): switch the user's channel
-- row off, so no new delivery is written for it and the pending ones end 'disabled' when their turn
-- comes (load_chunk.sql reads the flag). This is herald's only write to the application's
-- user_channels, and only to its `enabled` column. Index: user_channels primary key.
UPDATE user_channels c
SET enabled = false
FROM unnest(%(user_ids)s::bigint[], %(channels)s::text[], %(addresses)s::text[]) AS g(user_id, channel, address)
WHERE c.user_id = g.user_id AND c.channel = g.channel AND c.address = g.address AND c.enabled
