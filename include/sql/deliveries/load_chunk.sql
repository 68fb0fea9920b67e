-- A chunk's deliveries with what a send needs, locked until the chunk's results are recorded: while
-- they are locked no other run can claim them and nothing can release them, so the chunk records
-- only what it owns. Only what this run still holds. The notification may be gone (the application
-- deleted it: title NULL) and the channel may have been switched off since (channel_enabled false or
-- NULL). Indexes: notification_deliveries_claim_idx (the run's rows; with the ids, the primary key
-- where that is cheaper), primary keys of notifications and user_channels.
SELECT d.id, d.notification_id, d.user_id, d.channel, d.address, d.priority, d.attempts,
       n.notification_type, n.title, n.body, n.payload::text, n.trigger_id, n.created_at,
       c.enabled AS channel_enabled
FROM notification_deliveries d
LEFT JOIN notifications n ON n.id = d.notification_id
LEFT JOIN user_channels c ON c.user_id = d.user_id AND c.channel = d.channel AND c.address = d.address
WHERE d.id = ANY(%(ids)s::bigint[]) AND d.claimed_by = %(claim_id)s AND d.status = 'pending'
ORDER BY d.id
FOR UPDATE OF d
