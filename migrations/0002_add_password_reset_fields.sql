-- migrate:up
ALTER TABLE user ADD COLUMN reset_token VARCHAR(100);
ALTER TABLE user ADD COLUMN reset_token_expires DATETIME;

-- migrate:down
ALTER TABLE user DROP COLUMN reset_token_expires;
ALTER TABLE user DROP COLUMN reset_token;
