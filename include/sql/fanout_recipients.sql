-- Everyone who favorited each of these entities (the fan-out of many triggers at once).
-- Index: user_favorites_entity_idx (entity_type, entity_id, user_id), index-only scan.
SELECT e.entity_type, e.entity_id, array_agg(f.user_id ORDER BY f.user_id) FILTER (WHERE f.user_id IS NOT NULL)
FROM unnest(%(entity_types)s::text[], %(entity_ids)s::bigint[]) AS e(entity_type, entity_id)
LEFT JOIN user_favorites f ON f.entity_type = e.entity_type AND f.entity_id = e.entity_id
GROUP BY e.entity_type, e.entity_id
