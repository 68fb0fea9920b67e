-- Reference processor: one user and their preference row for one type. No row: the user does not
-- exist; enabled NULL: no preference row (enabled). Only the all-channels row (channel NULL) decides
-- the in-app notification. Indexes: users primary key, user_notification_preferences_key.
SELECT u.id, p.enabled
FROM users u
LEFT JOIN user_notification_preferences p
       ON p.user_id = u.id AND p.notification_type = %(notification_type)s
      AND p.channel IS NULL
WHERE u.id = %(user_id)s
