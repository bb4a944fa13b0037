-- The example loan application's starting schema.
-- migrate:up
CREATE TABLE user (
    id            INTEGER PRIMARY KEY,
    email         VARCHAR(120) NOT NULL UNIQUE,
    name          VARCHAR(100) NOT NULL,
    password_hash VARCHAR(128) NOT NULL,
    created_at    DATETIME DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE loan (
    id          INTEGER PRIMARY KEY,
    user_id     INTEGER NOT NULL REFERENCES user (id) ON DELETE CASCADE,
    amount      NUMERIC(12, 2) NOT NULL,
    interest    NUMERIC(5, 2) NOT NULL DEFAULT 0,
    status      VARCHAR(20) NOT NULL DEFAULT 'open',
    created_at  DATETIME DEFAULT CURRENT_TIMESTAMP
);

CREATE INDEX ix_loan_user_id ON loan (user_id);

CREATE TABLE payment (
    id       INTEGER PRIMARY KEY,
    loan_id  INTEGER NOT NULL REFERENCES loan (id) ON DELETE CASCADE,
    amount   NUMERIC(12, 2) NOT NULL,
    paid_at  DATETIME DEFAULT CURRENT_TIMESTAMP
);

CREATE INDEX ix_payment_loan_id ON payment (loan_id);

-- migrate:down
DROP TABLE payment;
DROP TABLE loan;
DROP TABLE user;
