-- herald bench: undo what a measurement wrote (the inbox, outcomes, outbox and run records), so the next
-- one starts from the seeded state without seeding again (which takes minutes at 100x W1).
TRUNCATE notifications, notification_outcomes, notification_deliveries, herald_runs RESTART IDENTITY
