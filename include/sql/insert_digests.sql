-- One digest notification per user (trigger_id NULL: it summarises many triggers).
INSERT INTO notifications (user_id, trigger_id, notification_type, title, body, payload, priority)
SELECT d.user_id, NULL, 'digest',
       format('%%s more updates on your favorites', d.held),
       format('You have %%s more updates that were held back so you are not flooded.', d.held),
       jsonb_build_object('held', d.held, 'through_trigger_id', d.last_trigger_id),
       'normal'
FROM unnest(%(user_ids)s::bigint[], %(held)s::int[], %(last_trigger_ids)s::bigint[])
     AS d(user_id, held, last_trigger_id)
RETURNING id, user_id
