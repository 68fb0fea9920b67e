-- herald bench --latency: the urgent lane's runs, and how many of them claimed nothing.
SELECT count(*), count(*) FILTER (WHERE triggers = 0) FROM herald_runs WHERE mode = 'urgent'
