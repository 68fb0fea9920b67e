-- Reference processor: everyone who favorited one entity, by ascending user id.
-- Index: user_favorites_entity_idx (index-only scan).
SELECT user_id
FROM user_favorites
WHERE entity_type = %(entity_type)s AND entity_id = %(entity_id)s
ORDER BY user_id
