-- Every notification template (a handful of rows).
SELECT trigger_type, title_template, body_template, bypass_preferences
FROM notification_templates
