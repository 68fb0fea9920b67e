-- Built-in trigger types. ON CONFLICT DO NOTHING: an operator's override of a row is never undone.
INSERT INTO notification_templates (trigger_type, title_template, body_template, bypass_preferences) VALUES
    ('price_drop',
     'Price drop: {{ item_name }}',
     '{{ item_name }} dropped from {{ old_price }} to {{ new_price }}.',
     false),
    ('back_in_stock',
     'Back in stock: {{ item_name }}',
     '{{ item_name }} is available again.',
     false),
    ('event_reminder',
     'Reminder: {{ event_name }}',
     '{{ event_name }} starts at {{ starts_at }}.',
     false),
    ('security_alert',
     'Security alert',
     '{{ message }}',
     true)
ON CONFLICT (trigger_type) DO NOTHING;
