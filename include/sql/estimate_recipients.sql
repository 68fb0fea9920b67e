-- Recipients per fan-out entity, to cut a run's claim into batches of similar size.
-- Index: user_favorites_entity_idx (index-only scan).
SELECT e.entity_type, e.entity_id, count(f.user_id) AS recipients
FROM unnest(%(entity_types)s::text[], %(entity_ids)s::bigint[]) AS e(entity_type, entity_id)
LEFT JOIN user_favorites f ON f.entity_type = e.entity_type AND f.entity_id = e.entity_id
GROUP BY e.entity_type, e.entity_id
