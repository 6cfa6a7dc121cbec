#!/bin/sh
# Kafka ACLs for one streamhash pipeline (Apache Kafka's kafka-acls.sh; deploy/README.md, "Kafka ACLs").
#
#   BOOTSTRAP=kafka:9093 ADMIN_CONFIG=admin.properties TOPIC=streamhash.images sh deploy/kafka-acls.sh
#
# Each process is its own principal (a SASL user or a TLS client certificate's name): a producer that may write
# images cannot write a model, and only the learner may write the models and codes topics (with
# STREAMHASH_SECURITY__MODEL_KEY on top: a principal that may write there but lacks the key still plants
# nothing). The query servers and the router read the store root, not Kafka: they get no ACL at all.
#
# Topic names follow streamhash's one rule (README, "Configuration"): from the images topic TOPIC,
# the DLQ is $TOPIC.dlq and the models and codes topics are <base>.models / <base>.codes, <base> being TOPIC
# without its ".images" suffix. Set DLQ_TOPIC, MODELS_TOPIC, CODES_TOPIC if the processes set them explicitly.
# Create the topics first (deploy/compose.yaml's kafka-init, or any process started once with an admin
# principal): the principals below may not create topics.
set -eu

BOOTSTRAP=${BOOTSTRAP:?set BOOTSTRAP to the brokers, host:port}
ADMIN_CONFIG=${ADMIN_CONFIG:?set ADMIN_CONFIG to a client properties file with an admin principal}
TOPIC=${TOPIC:-streamhash.images}
BASE=${TOPIC%.images}
DLQ_TOPIC=${DLQ_TOPIC:-$TOPIC.dlq}
MODELS_TOPIC=${MODELS_TOPIC:-$BASE.models}
CODES_TOPIC=${CODES_TOPIC:-$BASE.codes}
GROUP=${GROUP:-streamhash-worker}  # STREAMHASH_KAFKA__GROUP_ID
WORKER=${WORKER:-User:streamhash-worker}
LEARNER=${LEARNER:-User:streamhash-learner}
PRODUCER=${PRODUCER:-User:streamhash-producer}
DLQ_READER=${DLQ_READER:-User:streamhash-ops}
KAFKA_ACLS=${KAFKA_ACLS:-kafka-acls.sh}

acl() {
    "$KAFKA_ACLS" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add "$@"
}

# worker: consumes images and codes in its group, reads every model from the start of the models topic,
# dead-letters refused images, models and codes; at start checks that every topic exists and is co-partitioned
acl --allow-principal "$WORKER" --operation Read --operation Describe \
    --topic "$TOPIC" --topic "$CODES_TOPIC" --topic "$MODELS_TOPIC"
acl --allow-principal "$WORKER" --operation Write --operation Describe --topic "$DLQ_TOPIC"
acl --allow-principal "$WORKER" --operation Read --group "$GROUP"

# learner: resumes from the newest model, publishes models and learned codes (an idempotent producer: Write on
# the topic is enough from Kafka 2.8; older brokers also want IdempotentWrite on the cluster, below)
acl --allow-principal "$LEARNER" --operation Read --operation Write --operation Describe --topic "$MODELS_TOPIC"
acl --allow-principal "$LEARNER" --operation Write --operation Describe --topic "$CODES_TOPIC"
# at start it checks that every topic exists (a topic it cannot Describe looks missing, and it would try to
# create it) and that codes are co-partitioned with images
acl --allow-principal "$LEARNER" --operation Describe --topic "$TOPIC" --topic "$DLQ_TOPIC"
# acl --allow-principal "$LEARNER" --operation IdempotentWrite --cluster

# producer (streamhash produce, or your own): the images topic only
acl --allow-principal "$PRODUCER" --operation Write --operation Describe --topic "$TOPIC"

# operator (streamhash dlq): reads the DLQ without a group; --replay also writes images
acl --allow-principal "$DLQ_READER" --operation Read --operation Describe --topic "$DLQ_TOPIC"
acl --allow-principal "$DLQ_READER" --operation Write --operation Describe --topic "$TOPIC"

"$KAFKA_ACLS" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --list
