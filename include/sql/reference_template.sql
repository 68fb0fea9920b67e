-- Reference processor: the template of one trigger type (no row: unknown type). Index: primary key.
SELECT trigger_type, title_template, body_template, bypass_preferences
FROM notification_templates
WHERE trigger_type = %(trigger_type)s
