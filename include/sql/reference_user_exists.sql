-- Reference processor: does the direct recipient of a trigger exist? Index: users primary key.
SELECT EXISTS (SELECT 1 FROM users WHERE id = %(user_id)s)
